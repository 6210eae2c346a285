"""The whole NextStep model: text embeddings + ``image_in_projector`` at placeholder positions, the
backbone, ``lm_head`` for text and ``image_out_projector`` -> flow-matching head for image tokens, and the
joint training loss.

Image tokens travel position-aligned: ``image_tokens`` [B, T, token_dim] holds the 64-d token at every
placeholder position (anything elsewhere is ignored), so every shape is static under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

from nextstep_jax.models.attention import Masking
from nextstep_jax.models.backbone import Backbone
from nextstep_jax.models.fm_head import SimpleMLPAdaLN, flow_matching_errors
from nextstep_jax.models.layers import Projection, as_dtype, normal_init, partitioned
from nextstep_jax.sharding import LOGICAL_AXIS_RULES, constrain, shardings_of, use_mesh

IGNORE_INDEX = -100
_INPUT_NOISE_STREAM = 1  # fold_in constant of a row key for its input-token noise


def token_dim(cfg) -> int:
    return cfg.latent_channels * cfg.latent_patch_size ** 2


def scatter_image_tokens(input_ids: jnp.ndarray, tokens: jnp.ndarray, placeholder_id: int) -> jnp.ndarray:
    """Place ``tokens`` [N, F] at the placeholder positions of ``input_ids`` [B, T] in row-major (batch,
    position) order, as the reference fills them -> [B, T, F] (zeros elsewhere)."""
    is_ph = (input_ids == placeholder_id).reshape(-1)
    index = jnp.clip(jnp.cumsum(is_ph) - 1, 0, tokens.shape[0] - 1)
    placed = jnp.where(is_ph[:, None], tokens[index], 0)
    return placed.reshape(*input_ids.shape, tokens.shape[-1])


class NextStep(nn.Module):
    cfg: object

    def setup(self):
        cfg = self.cfg
        dtype = as_dtype(cfg.dtype)
        self.embed_tokens = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                                     embedding_init=partitioned(normal_init(), ("vocab", "embed")))
        self.backbone = Backbone(cfg)

        def dense(features, names, bias=True):
            return Projection((features,), names, use_bias=bias, dtype=dtype)

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
            return constrain(text, (*_ACT, "activation_embed"))
        image = self.image_in_projector(image_tokens.astype(dtype))
        return constrain(jnp.where((input_ids == self.cfg.image_placeholder_id)[..., None], image, text),
                         (*_ACT, "activation_embed"))

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
        masking = Masking.documents(b, t, attention_mask_2d, segment_ids)
        if positions is None:
            positions = jnp.broadcast_to(masking.q_slots, (b, t))
        hidden, _ = self.backbone(self.embed(input_ids, image_tokens), positions, masking)
        return hidden

    def step(self, embeds, kv_valid, cache, cache_index, positions=None):
        """Run ``embeds`` [B, T, E] at cache slots cache_index..cache_index+T-1 (prefill or decode).

        ``kv_valid`` [B, S] marks which cache slots hold real tokens *after* this write. Returns
        (hidden [B, T, E], updated cache)."""
        b, t = embeds.shape[:2]
        slots = cache_index + jnp.arange(t, dtype=jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(slots, (b, t))
        return self.backbone(embeds, positions, Masking(slots, kv_valid), cache, cache_index)

    # ------------------------------------------------------------------------------------------- loss
    def loss(self, input_ids, labels, image_tokens=None, image_loss_mask=None, attention_mask_2d=None,
             segment_ids=None, positions=None, *, rng=None, fm_noise=None, fm_u=None, totals=None,
             image_positions: int | None = None, text_positions: int | None = None):
        """Joint loss ``lm_loss_weight·CE + im_loss_weight·FM`` -> (loss, metrics).

        Position i predicts token i+1: LM cross-entropy where token i+1 is text and ``labels[i+1]`` !=
        -100; flow matching where token i+1 is an image placeholder, with target ``image_tokens[i+1]`` and
        weight ``image_loss_mask[i+1]`` (default 1). Pairs that straddle two packed documents are skipped.
        An empty LM or FM selection contributes 0 (text-only and image-only batches are both valid).

        The FM head runs on ``image_positions`` slots per row: each row's image targets gathered in order (a
        static bound the caller guarantees, e.g. the data pipeline's image slots x tokens per image; None: every
        position with zero weight elsewhere). The LM head runs on ``text_positions`` slots per row the same way
        when every row's text targets fit (a bound nothing guarantees: when a row has more, the LM head runs on
        every position instead; both programs are compiled and give the same loss), else on every position.
        Either way the batch stays sharded (nothing is gathered across rows). Each head
        walks its positions in chunks of ``loss_chunk_size``, rematerialised when there are several, so the
        vocabulary logits and head activations of one chunk exist at a time.

        FM noise and u: drawn from ``rng`` (one key, or one key per row: then a row's draws do not depend on
        which rows share its batch), or injected in the reference's order: ``fm_noise`` [N·batch_mul, D]
        and ``fm_u`` [N·batch_mul] for the first N image targets in row-major order, tiled ``batch_mul``
        times as whole blocks (targets beyond N get weight 0). ``totals`` (``loss_counts`` of a larger
        batch this one is a microbatch of) replaces this batch's own LM/FM counts as the denominators, so
        microbatch losses add up to the loss of the whole batch.
        """
        cfg = self.cfg
        inputs = image_tokens
        if image_tokens is not None and cfg.noise_strength > 0:
            if rng is None:
                raise ValueError(f"noise_strength={cfg.noise_strength} needs `rng` for the input-token noise")
            inputs = _noised_inputs(cfg, input_ids, image_tokens, rng)
        hidden = self(input_ids, inputs, attention_mask_2d, segment_ids, positions)
        pairs = _loss_pairs(cfg, input_ids, labels, image_loss_mask, attention_mask_2d, segment_ids)
        lm = {"hidden": hidden, "target": pairs["lm_target"], "weight": pairs["lm_weight"]}
        lm_sum, lm_gathered = _lm_sum(self, lm, text_positions)
        sums = {"lm": lm_sum, "fm": jnp.float32(0.0)}
        with_images = image_tokens is not None
        if with_images:
            fm = {"hidden": hidden, **_fm_inputs(cfg, image_tokens, pairs, rng, fm_noise, fm_u)}
            if image_positions is not None and image_positions < hidden.shape[1]:
                fm = _gather_targets(fm, pairs["is_image"], image_positions)
            sums["fm"] = _chunked_sum(self, _fm_chunk, fm, cfg.loss_chunk_size)
        counts = {"lm_tokens": jnp.sum(pairs["lm_weight"]),
                  "image_tokens": jnp.sum(fm["weight"]) if with_images else jnp.float32(0.0)}
        if totals is not None:
            counts = {k: jnp.asarray(totals[k], jnp.float32) for k in counts}
        lm_loss = sums["lm"] / jnp.maximum(counts["lm_tokens"], 1.0)
        im_loss = sums["fm"] / (cfg.fm_head_batch_mul * counts["image_tokens"] + 1e-8)
        loss = cfg.lm_loss_weight * lm_loss + cfg.im_loss_weight * im_loss
        return loss, {"loss": loss, "lm_loss": lm_loss, "im_loss": im_loss, "lm_gathered": lm_gathered, **counts}


def loss_counts(cfg, input_ids, labels, image_loss_mask=None, attention_mask_2d=None, segment_ids=None,
                with_images: bool = True) -> dict:
    """The LM and FM target counts ``NextStep.loss`` divides by (``totals`` for microbatches)."""
    pairs = _loss_pairs(cfg, input_ids, labels, image_loss_mask, attention_mask_2d, segment_ids)
    return {"lm_tokens": jnp.sum(pairs["lm_weight"]),
            "image_tokens": jnp.sum(pairs["fm_weight"]) if with_images else jnp.float32(0.0)}


_ACT = ("activation_batch", "activation_length")


def _next(x: jnp.ndarray, fill) -> jnp.ndarray:
    """x[:, i+1] at position i; ``fill`` at the last position (it predicts nothing)."""
    pad = jnp.full((x.shape[0], 1, *x.shape[2:]), fill, x.dtype)
    return jnp.concatenate([x[:, 1:], pad], axis=1)


def _loss_pairs(cfg, input_ids, labels, image_loss_mask, attention_mask_2d, segment_ids) -> dict:
    """Per position i of [B, T] (the pair i -> i+1): LM target and weight, FM weight, image-target flag."""
    ids_next = _next(input_ids, cfg.pad_token_id)
    valid = _next(jnp.ones(input_ids.shape, bool), False)
    if segment_ids is not None:
        seg_next = _next(segment_ids, 0)
        valid &= (seg_next == segment_ids) & (seg_next > 0)
    if attention_mask_2d is not None:
        valid &= _next(attention_mask_2d.astype(bool), False)
    is_image = (ids_next == cfg.image_placeholder_id) & valid
    labels_next = _next(labels, IGNORE_INDEX)
    lm_weight = (~is_image & valid & (labels_next != IGNORE_INDEX)).astype(jnp.float32)
    fm_weight = is_image.astype(jnp.float32)
    if image_loss_mask is not None:
        fm_weight *= _next(image_loss_mask, 0).astype(jnp.float32)
    return {"lm_target": constrain(jnp.clip(labels_next, 0, cfg.vocab_size - 1), _ACT),
            "lm_weight": constrain(lm_weight, _ACT), "fm_weight": constrain(fm_weight, _ACT),
            "is_image": is_image}


def _fm_inputs(cfg, image_tokens, pairs, rng, fm_noise, fm_u) -> dict:
    """FM targets x1 [B, T, D], weight [B, T], noise [B, T, batch_mul, D] and u [B, T, batch_mul]."""
    b, t = pairs["is_image"].shape
    mul, dim = cfg.fm_head_batch_mul, token_dim(cfg)
    weight = pairs["fm_weight"]
    if fm_noise is not None and fm_u is not None:
        n = fm_noise.shape[0] // mul
        if fm_noise.shape != (n * mul, dim) or fm_u.shape != (n * mul,):
            raise ValueError(f"fm_noise {fm_noise.shape} / fm_u {fm_u.shape} must be {(n * mul, dim)} / "
                             f"{(n * mul,)} (targets x fm_head_batch_mul={mul})")
        rank = jnp.cumsum(pairs["is_image"].reshape(-1)).reshape(b, t) - 1
        weight = jnp.where(rank < n, weight, 0.0)
        index = jnp.clip(rank, 0, n - 1)[..., None] + n * jnp.arange(mul)
        noise, u = fm_noise.astype(jnp.float32)[index], fm_u.astype(jnp.float32)[index]
    elif rng is not None:
        def draws(key):
            k_noise, k_u = jax.random.split(key)
            return (jax.random.normal(k_noise, (t, mul, dim), jnp.float32),
                    jax.random.normal(k_u, (t, mul), jnp.float32))

        noise, u = jax.vmap(draws)(_row_keys(rng, b))
    else:
        raise ValueError("NextStep.loss with image tokens needs `rng` unless both `fm_noise` and `fm_u` are given")
    return {"x1": constrain(_next(image_tokens.astype(jnp.float32), 0.0), (*_ACT, None)),
            "weight": constrain(weight, _ACT), "noise": constrain(noise, (*_ACT, None, None)),
            "u": constrain(u, (*_ACT, None))}


def _image_token_noise_std(cfg, input_ids: jnp.ndarray) -> jnp.ndarray:
    """[B, T] std of the training input noise at each placeholder (0 elsewhere): ``noise_strength`` x k / (n - 1)
    for the k-th of an image's n tokens (raster order), an image being the placeholders between a BOI and the
    next EOI. The official trainer grows the std over the latent pixels; per token is the same ramp at patch
    granularity (the p x p latent pixels of one token share a value)."""
    is_ph = input_ids == cfg.image_placeholder_id
    count = jnp.cumsum(is_ph, axis=1)
    before = jax.lax.cummax(jnp.where(input_ids == cfg.boi, count, 0), axis=1)
    big = jnp.iinfo(count.dtype).max
    end = jax.lax.cummin(jnp.where(input_ids == cfg.eoi, count, big), axis=1, reverse=True)
    end = jnp.where(end == big, count[:, -1:], end)  # an image cut by the row's end: its tokens so far
    index, n = count - before - 1, end - before
    std = cfg.noise_strength * index / jnp.maximum(n - 1, 1)
    return jnp.where(is_ph, std, 0.0).astype(jnp.float32)


def _noised_inputs(cfg, input_ids, image_tokens, rng) -> jnp.ndarray:
    """The input image tokens with that noise; each row draws from its own key (folded off its FM key)."""
    std = _image_token_noise_std(cfg, input_ids)
    keys = jax.vmap(lambda k: jax.random.fold_in(k, _INPUT_NOISE_STREAM))(_row_keys(rng, input_ids.shape[0]))
    noise = jax.vmap(lambda k: jax.random.normal(k, image_tokens.shape[1:], jnp.float32))(keys)
    return (image_tokens.astype(jnp.float32) + std[..., None] * noise).astype(image_tokens.dtype)


def _row_keys(rng: jax.Array, rows: int) -> jax.Array:
    """One key per row: ``rng`` itself when it already holds one per row, else fold_in(rng, row)."""
    single_ndim = 0 if jax.dtypes.issubdtype(rng.dtype, jax.dtypes.prng_key) else 1
    if rng.ndim > single_ndim:
        if rng.shape[0] != rows:
            raise ValueError(f"rng holds {rng.shape[0]} row keys for a batch of {rows} rows")
        return rng
    return jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(rows))


def _gather_targets(xs: dict, selected: jnp.ndarray, slots: int) -> dict:
    """Each row's first ``slots`` selected positions in order -> [B, slots, ...]; slots past a row's
    selection get weight 0. A per-row gather: rows stay where they are."""
    order = jnp.argsort(~selected, axis=1, stable=True)[:, :slots]
    filled = jnp.take_along_axis(selected, order, axis=1)
    gathered = {k: jnp.take_along_axis(v, order.reshape(*order.shape, *([1] * (v.ndim - 2))), axis=1)
                for k, v in xs.items()}
    gathered["weight"] = jnp.where(filled, gathered["weight"], 0.0)
    return gathered


def _lm_sum(model: "NextStep", lm: dict, slots: int | None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The LM loss sum, on ``slots`` gathered text targets per row when every row's fit, else everywhere;
    and 1.0 when it was gathered."""
    chunk = model.cfg.loss_chunk_size
    everywhere = lambda mdl, xs: _chunked_sum(mdl, _lm_chunk, xs, chunk)
    if slots is None or slots >= lm["hidden"].shape[1]:
        return everywhere(model, lm), jnp.float32(0.0)
    is_text = lm["weight"] > 0
    fits = jnp.max(jnp.sum(is_text, axis=1)) <= slots
    gathered = lambda mdl, xs: _chunked_sum(mdl, _lm_chunk, _gather_targets(xs, is_text, slots), chunk)
    return nn.cond(fits, gathered, everywhere, model, lm), fits.astype(jnp.float32)


def _lm_chunk(model: "NextStep", xs: dict) -> jnp.ndarray:
    """Weighted LM negative log-likelihood sum of one chunk."""
    h = constrain(xs["hidden"], (*_ACT, "activation_embed"))
    logits = constrain(model.logits(h), (*_ACT, "activation_vocab"))
    picked = jnp.take_along_axis(logits, xs["target"][..., None], axis=-1)[..., 0]
    nll = jax.nn.logsumexp(logits, axis=-1) - picked
    return jnp.sum(nll * xs["weight"])


def _fm_chunk(model: "NextStep", xs: dict) -> jnp.ndarray:
    """Weighted flow-matching squared-error sum of one chunk, every target repeated ``batch_mul`` times."""
    cfg = model.cfg
    h = constrain(xs["hidden"], (*_ACT, "activation_embed"))
    b, c, mul, dim = xs["noise"].shape
    cond = model.condition(h) if cfg.loss_uses_out_projector else h
    c_emb = model.image_head.embed_condition(cond.reshape(b * c, -1))
    rows = lambda x: x.reshape(b * c * mul, *x.shape[3:])
    c_emb = rows(jnp.broadcast_to(c_emb.reshape(b, c, 1, -1), (b, c, mul, c_emb.shape[-1])))
    x1 = jax.lax.stop_gradient(jnp.broadcast_to(xs["x1"][:, :, None], (b, c, mul, dim)))
    err = flow_matching_errors(lambda x, t, ce: model.image_head.velocity(x, t, ce), rows(x1), c_emb,
                               rows(xs["noise"]), rows(xs["u"]))
    return jnp.sum(err * rows(jnp.broadcast_to(xs["weight"][:, :, None], (b, c, mul))))


def _chunked_sum(model: "NextStep", chunk_sum, xs: dict, chunk: int) -> jnp.ndarray:
    """``chunk_sum`` over [B, L, ...] split into ceil(L / chunk) chunks along L (zero-weight padding)."""
    length = xs["hidden"].shape[1]
    chunk = min(chunk, length)
    n = -(-length // chunk)
    if n == 1:  # one chunk: rematerialising it would only recompute the heads
        return chunk_sum(model, xs)
    if n * chunk != length:
        xs = {k: jnp.pad(v, [(0, 0), (0, n * chunk - length)] + [(0, 0)] * (v.ndim - 2)) for k, v in xs.items()}
    # [B, n·chunk, ...] -> [n, B, chunk, ...]: the scan walks chunks; each slice keeps the batch sharding.
    xs = {k: jnp.moveaxis(v.reshape(v.shape[0], n, chunk, *v.shape[2:]), 1, 0) for k, v in xs.items()}

    def body(mdl, total, x):
        return total + chunk_sum(mdl, x), None

    scan = nn.scan(nn.remat(body, prevent_cse=False), variable_broadcast="params", split_rngs={"params": False},
                   length=n)
    return scan(model, jnp.float32(0.0), xs)[0]


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
    rules = rules or LOGICAL_AXIS_RULES
    shardings = shardings_of(abstract_variables(cfg), mesh, rules)["params"]
    with use_mesh(mesh, rules):  # the parameters' own constraints apply inside the init program too
        return jax.jit(init, out_shardings=shardings)(rng)


def abstract_variables(cfg) -> dict:
    """Shapes/dtypes/logical axes of every variable without allocating anything."""
    return jax.eval_shape(lambda: init_variables(cfg, jax.random.key(0)))
