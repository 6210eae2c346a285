"""Analytic FLOPs of one NextStep train step (the trainer's MFU, ``plan`` and the benchmark use this one count).

A matmul with a [m, n] kernel costs 2·m·n FLOPs per row forward and twice that backward, so a parameter
used once per token costs 6 FLOPs per token ("6N"). For a packed batch of B rows x T tokens, ``model`` FLOPs
count the useful work, as the official trainer does it (it gathers each head's positions):

- the backbone layers on every position: 6·N, and causal attention: 3 · 2·T·heads·head_dim per layer (a
  query sees T/2 keys on average);
- the LM head on the positions that are not image targets; the image path on the image targets
  (``image_targets`` per row; without it, every position counts for both heads): the in- and out-projectors
  and the head's condition embedding once, the rest of the flow-matching head ``fm_head_batch_mul`` times.

``hardware`` FLOPs are what the step runs: attention dense over all T keys (the masked half is computed too), the
LM head on ``text_positions`` gathered slots per row (every position when None, where ``NextStep.loss`` weights
the image targets zero), the in-projector on every position, the rest of the image path on ``image_positions``
slots per row (every position when None), and what rematerialisation recomputes: one more forward of the layers
under a remat policy (exact for "full", an upper bound for the others) and of a loss head that runs in several
chunks. The frozen VAE encoder of pixel batches and elementwise work are not counted.
"""

from __future__ import annotations

import math

import jax
from flax import linen as nn

from nextstep_jax.models.nextstep import abstract_variables


def _matmul_params(tree) -> int:
    """Kernel entries of a parameter subtree (biases and norm scales do no matmul work)."""
    flat = jax.tree_util.tree_flatten_with_path(tree)[0]
    return sum(math.prod(leaf.shape) for path, leaf in flat
               if getattr(path[-1], "key", None) in ("kernel", "embedding"))


def forward_flops(model_cfg, seq_len: int) -> dict[str, float]:
    """Forward FLOPs of one position through each part: ``layers`` (matmuls), ``attention`` (dense over
    ``seq_len`` keys), ``lm_head``, ``image_path`` (out-projector and the flow-matching head,
    ``fm_head_batch_mul`` times but for its condition embedding) and ``image_in`` (the in-projector)."""
    params = nn.unbox(abstract_variables(model_cfg))["params"]
    lm_head = params["embed_tokens"] if model_cfg.tie_word_embeddings else params["lm_head"]
    head = params["image_head"]
    cond = _matmul_params(head["cond_embed"])
    per_copy = _matmul_params(head) - cond
    image_path = 2 * (_matmul_params(params["image_out_projector"]) + cond) + 2 * model_cfg.fm_head_batch_mul * per_copy
    return {"layers": 2.0 * _matmul_params(params["backbone"]),
            "attention": float(model_cfg.num_layers * 4 * seq_len * model_cfg.num_heads * model_cfg.head_dim),
            "lm_head": 2.0 * _matmul_params(lm_head), "image_path": float(image_path),
            "image_in": 2.0 * _matmul_params(params["image_in_projector"])}


def train_step_flops(model_cfg, batch_size: int, seq_len: int, with_images: bool = True,
                     image_targets: float | None = None, image_positions: int | None = None,
                     text_positions: int | None = None) -> dict[str, float]:
    """``model`` (useful) and ``hardware`` (run) FLOPs of one step over ``batch_size`` rows of ``seq_len``
    tokens; ``image_targets``, ``image_positions`` and ``text_positions`` are per row (see the module
    docstring). An array of ``image_targets`` gives an array of counts, one per entry."""
    part = forward_flops(model_cfg, seq_len)
    image_positions = seq_len if image_positions is None else min(image_positions, seq_len)
    text_positions = seq_len if text_positions is None else min(text_positions, seq_len)
    if not with_images:
        image_targets, image_positions = 0.0, 0
    lm_positions = seq_len if image_targets is None else seq_len - image_targets
    image_targets = image_positions if image_targets is None else image_targets
    layers = (part["layers"] + part["attention"]) * seq_len
    useful = ((part["layers"] + part["attention"] / 2) * seq_len + part["lm_head"] * lm_positions
              + (part["image_path"] + part["image_in"]) * image_targets)
    heads = (part["lm_head"] * text_positions + part["image_path"] * image_positions
             + part["image_in"] * seq_len * with_images)
    recompute = layers if model_cfg.remat_policy != "none" else 0.0
    chunk = model_cfg.loss_chunk_size
    recompute += (part["lm_head"] * text_positions * (text_positions > chunk)
                  + part["image_path"] * image_positions * (image_positions > chunk))
    return {"model": 3 * useful * batch_size, "hardware": (3 * (layers + heads) + recompute) * batch_size,
            "tokens": float(batch_size * seq_len)}
