"""Flow-matching head sampling with every step's adaLN modulation computed up front.

While one token is sampled the condition c is fixed and t runs over a static grid, so each block's
modulation ``Linear(SiLU(time_embed(t) + cond_embed(c)))`` — about 60% of the head's weights — is evaluated
for all steps in one matmul of ``steps × rows`` rows instead of ``steps`` matmuls of ``rows`` rows. At small
batch the head is bound by streaming its weights once per step; this leaves only the two MLP matrices per
block to stream. The network is ``fm_head.SimpleMLPAdaLN`` (same params, same op order and dtypes) and the
sampler is ``fm_head.sample``: its velocity function looks the step's modulations up by the value of t.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax.models.fm_head import LN_EPS, sample, timestep_embedding, timesteps


def _dense(p, x, dtype):
    return jnp.dot(x.astype(dtype), p["kernel"].astype(dtype)) + p["bias"].astype(dtype)


def _layer_norm(x, dtype, p=None):
    """flax LayerNorm(use_fast_variance=False): float32 two-pass statistics, optional affine."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    mul = jax.lax.rsqrt(var + LN_EPS)
    if p is not None:
        mul = mul * p["scale"]
    y = (x32 - mean) * mul
    if p is not None:
        y = y + p["bias"]
    return y.astype(dtype)


def _num_blocks(head) -> int:
    return sum(1 for k in head if k.startswith("res_blocks_"))


def eval_times(num_steps: int, timesteps_shift: float, last_step_size: float, grid: str) -> np.ndarray:
    """The t values at which ``sample`` evaluates the network (float32)."""
    ts = timesteps(num_steps, timesteps_shift, last_step_size, grid)
    return ts if grid == "nextstep1" else ts[:-1]


def modulation_table(head, c, t_values: np.ndarray, dtype):
    """Per block [rows, len(t_values), 3·dim] and final [rows, len(t_values), 2·dim] modulations."""
    c_emb = _dense(head["cond_embed"], c, dtype)
    te = head["time_embed"]
    t = jnp.asarray(t_values).astype(dtype)
    t_emb = _dense(te["mlp_2"], jax.nn.silu(_dense(te["mlp_0"], timestep_embedding(t).astype(dtype), dtype)), dtype)
    y = jax.nn.silu(c_emb[:, None, :] + t_emb[None])
    blocks = [_dense(head[f"res_blocks_{i}"]["adaLN_modulation_1"], y, dtype) for i in range(_num_blocks(head))]
    return blocks, _dense(head["final_layer"]["adaLN_modulation_1"], y, dtype)


def velocity_from_table(head, x, index, table, dtype):
    """The head network at the table's step ``index`` (rows of ``x`` = rows of the table)."""
    blocks, final = table
    h = _dense(head["input_proj"], x, dtype)
    for i, mods in enumerate(blocks):
        p = head[f"res_blocks_{i}"]
        shift, scale, gate = jnp.split(jax.lax.dynamic_index_in_dim(mods, index, 1, keepdims=False), 3, axis=-1)
        m = _layer_norm(h, dtype, p["in_ln"]) * (1 + scale) + shift
        m = _dense(p["mlp_2"], jax.nn.silu(_dense(p["mlp_0"], m, dtype)), dtype)
        h = h + gate * m
    shift, scale = jnp.split(jax.lax.dynamic_index_in_dim(final, index, 1, keepdims=False), 2, axis=-1)
    h = _layer_norm(h, dtype) * (1 + scale) + shift
    return _dense(head["final_layer"]["linear"], h, dtype)


def sample_tokens(head, c, *, cfg_mult: int, num_steps: int, timesteps_shift: float = 1.0,
                  last_step_size: float = 0.04, grid: str = "nextstep1", dtype: Any = jnp.float32,
                  **sample_kwargs) -> jax.Array:
    """``fm_head.sample`` of the head with params ``head`` (the ``image_head`` subtree) for conditions ``c``
    [B·cfg_mult, cond_dim]; ``sample_kwargs``: cfg, cfg_img, method, noise_repeat, key, noises."""
    t_values = eval_times(num_steps, timesteps_shift, last_step_size, grid)
    # sample() feeds t rounded to the compute dtype, so the lookup compares in that dtype; points that round
    # to the same value have identical modulations, so any match is the right one.
    t_keys = jnp.asarray(t_values).astype(dtype)
    table = modulation_table(head, c, t_values, dtype)

    def velocity_fn(x, t, tab):
        return velocity_from_table(head, x, jnp.argmax(t_keys == t[0]), tab, dtype)

    return sample(velocity_fn, table, cfg_mult=cfg_mult, num_steps=num_steps, timesteps_shift=timesteps_shift,
                  last_step_size=last_step_size, grid=grid, compute_dtype=dtype,
                  token_dim=head["final_layer"]["linear"]["kernel"].shape[-1], **sample_kwargs)
