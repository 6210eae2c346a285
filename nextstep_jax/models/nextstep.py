"""The whole NextStep model: text embeddings + ``image_in_projector`` at placeholder positions, the
backbone, ``lm_head`` for text and ``image_out_projector`` -> flow-matching head for image tokens, and the
joint training loss (REFERENCE §1, §4, §6).

Image tokens travel position-aligned: ``image_tokens`` [B, T, token_dim] holds the 64-d token at every
placeholder position (anything elsewhere is ignored), so every shape is static under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from nextstep_jax.models.attention import attention_mask
from nextstep_jax.models.backbone import Backbone
from nextstep_jax.models.fm_head import SimpleMLPAdaLN, flow_matching_loss
from nextstep_jax.models.layers import as_dtype, normal_init, partitioned

IGNORE_INDEX = -100


def token_dim(cfg) -> int:
    return cfg.latent_channels * cfg.latent_patch_size ** 2


def scatter_image_tokens(input_ids: jnp.ndarray, tokens: jnp.ndarray, placeholder_id: int) -> jnp.ndarray:
    """Place ``tokens`` [N, F] at the placeholder positions of ``input_ids`` [B, T] in row-major (batch,
    position) order, as the reference fills them -> [B, T, F] (zeros elsewhere)."""
    is_ph = (input_ids == placeholder_id).reshape(-1)
    index = jnp.clip(jnp.cumsum(is_ph) - 1, 0, tokens.shape[0] - 1)
    placed = jnp.where(is_ph[:, None], tokens[index], 0)
    return placed.reshape(*input_ids.shape, tokens.shape[-1])


def _select_rows(mask: jnp.ndarray, num_rows: int | None) -> jnp.ndarray:
    """Indices of the True entries of flat ``mask`` (row-major), padded to a static ``num_rows``; all
    positions when ``num_rows`` is None."""
    if num_rows is None:
        return jnp.arange(mask.shape[0])
    return jnp.nonzero(mask, size=num_rows, fill_value=0)[0]


class NextStep(nn.Module):
    cfg: object

    def setup(self):
        cfg = self.cfg
        dtype = as_dtype(cfg.dtype)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                                     embedding_init=partitioned(normal_init(), ("vocab", "embed")))
        self.backbone = Backbone(cfg)

        def dense(features, names, bias=True):
            return nn.Dense(features, use_bias=bias, dtype=dtype, param_dtype=jnp.float32,
                            kernel_init=partitioned(normal_init(), names),
                            bias_init=partitioned(nn.initializers.zeros, names[1:]))

        self.image_in_projector = dense(cfg.hidden_size, ("token", "embed"))
        self.image_out_projector = dense(cfg.hidden_size, ("embed", "projector"))
        self.image_head = SimpleMLPAdaLN(token_dim=token_dim(cfg), dim=cfg.fm_head_dim,
                                         num_layers=cfg.fm_head_layers, mlp_ratio=cfg.fm_head_mlp_ratio,
                                         dtype=dtype)
        if not cfg.tie_word_embeddings:
            self.lm_head = dense(cfg.vocab_size, ("embed", "vocab"), bias=False)

    # ----------------------------------------------------------------------------------------- pieces
    def embed(self, input_ids: jnp.ndarray, image_tokens: jnp.ndarray | None = None) -> jnp.ndarray:
        """Input embeddings [B, T, E]: ``embed_tokens`` for text, ``image_in_projector`` at placeholders."""
        dtype = as_dtype(self.cfg.dtype)
        # Gather rows first, then cast: never cast the whole vocabulary table.
        text = jnp.take(self.embed_tokens.embedding, input_ids, axis=0).astype(dtype)
        if image_tokens is None:
            return text
        image = self.image_in_projector(image_tokens.astype(dtype))
        return jnp.where((input_ids == self.cfg.image_placeholder_id)[..., None], image, text)

    def logits(self, hidden: jnp.ndarray) -> jnp.ndarray:
        """float32 LM logits."""
        if self.cfg.tie_word_embeddings:
            return self.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def condition(self, hidden: jnp.ndarray) -> jnp.ndarray:
        """Flow-matching head condition c = image_out_projector(h)."""
        return self.image_out_projector(hidden)

    def head_velocity(self, x, t, c):
        return self.image_head(x, t, c)

    def touch_all(self, input_ids, image_tokens):
        """Runs every submodule once, so ``init(..., method=NextStep.touch_all)`` creates all params."""
        hidden = self(input_ids, image_tokens)
        c = self.condition(hidden[:, 0])
        v = self.head_velocity(image_tokens[:, 0], jnp.zeros(c.shape[:1], jnp.float32), c)
        return self.logits(hidden), v

    # --------------------------------------------------------------------------------------- forwards
    def __call__(self, input_ids, image_tokens=None, attention_mask_2d=None, segment_ids=None, positions=None):
        """Full forward without cache -> final-norm hidden states [B, T, E].

        ``attention_mask_2d`` [B, T] (1 = real token, left padding allowed) and/or ``segment_ids`` [B, T]
        (packed documents, 0 = padding; queries see only their own document). ``positions`` default to
        the slot index 0..T-1 for every row, as the reference (also for left-padded rows).
        """
        b, t = input_ids.shape
        slots = jnp.arange(t, dtype=jnp.int32)
        valid = jnp.ones((b, t), bool) if attention_mask_2d is None else attention_mask_2d.astype(bool)
        if segment_ids is not None:
            valid &= segment_ids > 0
        mask = attention_mask(slots, valid, segment_ids, segment_ids)
        if positions is None:
            positions = jnp.broadcast_to(slots, (b, t))
        hidden, _ = self.backbone(self.embed(input_ids, image_tokens), positions, mask)
        return hidden

    def step(self, embeds, kv_valid, cache, cache_index, positions=None):
        """Run ``embeds`` [B, T, E] at cache slots cache_index..cache_index+T-1 (prefill or decode).

        ``kv_valid`` [B, S] marks which cache slots hold real tokens *after* this write. Returns
        (hidden [B, T, E], updated cache)."""
        b, t = embeds.shape[:2]
        slots = cache_index + jnp.arange(t, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(slots, (b, t))
        mask = attention_mask(slots, kv_valid)
        return self.backbone(embeds, positions, mask, cache, cache_index)

    # ------------------------------------------------------------------------------------------- loss
    def loss(self, input_ids, labels, image_tokens=None, image_loss_mask=None, attention_mask_2d=None,
             segment_ids=None, positions=None, *, rng=None, fm_noise=None, fm_u=None, lm_rows=None,
             fm_rows=None):
        """Joint loss ``lm_loss_weight·CE + im_loss_weight·FM`` (REFERENCE §6) -> (loss, metrics).

        Position i predicts token i+1: LM cross-entropy where token i+1 is text and ``labels[i+1]`` !=
        -100; flow matching where token i+1 is an image placeholder, with target ``image_tokens[i+1]`` and
        weight ``image_loss_mask[i+1]`` (default 1). Pairs that straddle two packed documents are skipped.
        ``lm_rows``/``fm_rows`` optionally cap the rows gathered for each head to a static count (rows are
        taken in row-major order; the FM noise/u rows follow that order, tiled ``fm_head_batch_mul`` times).
        An empty LM or FM selection contributes 0 (text-only and image-only batches are both valid).
        """
        cfg = self.cfg
        hidden = self(input_ids, image_tokens, attention_mask_2d, segment_ids, positions)
        h = hidden[:, :-1].reshape(-1, hidden.shape[-1])
        ids_next = input_ids[:, 1:].reshape(-1)
        same_doc = jnp.ones_like(ids_next, bool)
        if segment_ids is not None:
            same_doc = ((segment_ids[:, 1:] == segment_ids[:, :-1]) & (segment_ids[:, 1:] > 0)).reshape(-1)
        if attention_mask_2d is not None:
            same_doc &= attention_mask_2d[:, 1:].reshape(-1).astype(bool)
        is_img_next = (ids_next == cfg.image_placeholder_id) & same_doc

        labels_next = labels[:, 1:].reshape(-1)
        lm_mask = ~is_img_next & same_doc & (labels_next != IGNORE_INDEX)
        rows = _select_rows(lm_mask, lm_rows)
        logits = self.logits(h[rows])
        target = jnp.clip(labels_next[rows], 0, cfg.vocab_size - 1)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), target[:, None], axis=-1)[:, 0]
        weight = lm_mask[rows].astype(jnp.float32)
        lm_count = jnp.sum(weight)
        lm_loss = jnp.sum(nll * weight) / jnp.maximum(lm_count, 1.0)

        if image_tokens is None:
            im_loss = jnp.float32(0.0)
            im_count = jnp.float32(0.0)
        else:
            fm_weight = is_img_next.astype(jnp.float32)
            if image_loss_mask is not None:
                fm_weight *= image_loss_mask[:, 1:].reshape(-1).astype(jnp.float32)
            rows = _select_rows(is_img_next, fm_rows)
            x1 = image_tokens[:, 1:].reshape(-1, image_tokens.shape[-1])[rows]
            c = self.condition(h[rows]) if cfg.loss_uses_out_projector else h[rows]
            im_loss = flow_matching_loss(self.head_velocity, x1, c, fm_weight[rows],
                                         batch_mul=cfg.fm_head_batch_mul, key=rng, noise=fm_noise, u=fm_u)
            im_count = jnp.sum(fm_weight[rows])
        loss = cfg.lm_loss_weight * lm_loss + cfg.im_loss_weight * im_loss
        return loss, {"loss": loss, "lm_loss": lm_loss, "im_loss": im_loss, "lm_tokens": lm_count,
                      "image_tokens": im_count}


def _init_inputs(cfg):
    return jnp.zeros((1, 2), jnp.int32), jnp.zeros((1, 2, token_dim(cfg)), jnp.float32)


def init_variables(cfg, rng: jax.Array) -> dict:
    """Boxed variables (``nn.Partitioned`` leaves carry the logical axis names)."""
    init = jax.jit(lambda key, *inputs: NextStep(cfg).init(key, *inputs, method=NextStep.touch_all))
    return init(rng, *_init_inputs(cfg))


def init_params(cfg, rng: jax.Array, mesh=None, rules=None) -> dict:
    """Unboxed float32 params; with a ``mesh`` they are created directly sharded by their logical axes, so a
    large model never exists whole on one device."""
    init = lambda key: nn.unbox(NextStep(cfg).init(key, *_init_inputs(cfg), method=NextStep.touch_all))["params"]
    if mesh is None:
        return jax.jit(init)(rng)
    from nextstep_jax.sharding import LOGICAL_AXIS_RULES, shardings_of

    shardings = shardings_of(abstract_variables(cfg), mesh, rules or LOGICAL_AXIS_RULES)["params"]
    return jax.jit(init, out_shardings=shardings)(rng)


def abstract_variables(cfg) -> dict:
    """Shapes/dtypes/logical axes of every variable without allocating anything."""
    return jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
