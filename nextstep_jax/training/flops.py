"""Analytic FLOPs of one NextStep train step (the trainer's MFU and ``plan`` use this one count).

A matmul with a [m, n] kernel costs 2·m·n FLOPs per row forward and twice that backward, so a parameter
used once per token costs 6 FLOPs per token ("6N"). Per position of a packed batch of B rows x T tokens:

- the backbone layers and the LM head (the loss runs it on every position): 6·N;
- attention, dense over all T keys as the XLA kernel computes it: 3 · 4·T·heads·head_dim per layer;
- the image path on every position (``NextStep.loss`` weights non-image positions zero rather than
  gathering): image_in_projector and image_out_projector and the head's condition embedding once, the rest of
  the flow-matching head ``fm_head_batch_mul`` times.

``model`` FLOPs are that 3x forward count (what MFU conventionally divides by). ``hardware`` adds what
rematerialisation recomputes: one more forward of the layers under a remat policy (exact for "full", an
upper bound for the others) and of the chunked loss heads (always rematerialised). The frozen VAE encoder of
pixel batches and elementwise work are not counted.
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


def forward_flops_per_token(model_cfg, seq_len: int, with_images: bool = True) -> dict[str, float]:
    """Forward FLOPs per position, split into the parts remat treats differently."""
    params = nn.unbox(abstract_variables(model_cfg))["params"]
    layers = _matmul_params(params["backbone"])
    lm_head = _matmul_params(params["embed_tokens"] if model_cfg.tie_word_embeddings else params["lm_head"])
    attention = model_cfg.num_layers * 4 * seq_len * model_cfg.num_heads * model_cfg.head_dim
    heads = 2 * lm_head
    if with_images:
        head = params["image_head"]
        cond = _matmul_params(head["cond_embed"])
        per_copy = _matmul_params(head) - cond
        heads += 2 * (_matmul_params(params["image_out_projector"]) + cond) + 2 * model_cfg.fm_head_batch_mul * per_copy
    image_in = 2 * _matmul_params(params["image_in_projector"]) if with_images else 0
    return {"layers": 2.0 * layers + attention, "heads": float(heads), "embed": float(image_in)}


def train_step_flops(model_cfg, batch_size: int, seq_len: int, with_images: bool = True) -> dict[str, float]:
    """``model`` and ``hardware`` FLOPs of one step over ``batch_size`` rows of ``seq_len`` tokens."""
    per_token = forward_flops_per_token(model_cfg, seq_len, with_images)
    tokens = batch_size * seq_len
    forward = sum(per_token.values()) * tokens
    recompute = per_token["heads"] * tokens
    if model_cfg.remat_policy != "none":
        recompute += per_token["layers"] * tokens
    return {"model": 3 * forward, "hardware": 3 * forward + recompute, "tokens": float(tokens)}
