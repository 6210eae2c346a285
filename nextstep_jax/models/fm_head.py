"""Flow-matching head of NextStep-1 (the official `modeling_fm_head.py`): the `SimpleMLPAdaLN` network and its
training loss; its samplers are in ``fm_sampler``.

Numerics: params float32, matmuls in the compute dtype; LayerNorm statistics, the sinusoidal time features and
the loss in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

FREQ_DIM = 256
MAX_PERIOD = 10000.0
LN_EPS = 1e-6

_ACT_EMBED = ("activation_batch", "activation_embed")

VelocityFn = Callable[[jax.Array, jax.Array, Any], jax.Array]

_xavier = nn.initializers.xavier_uniform()  # == torch xavier_uniform_ on the transposed [out, in] weight
_zeros = nn.initializers.zeros_init()


def _dense(features: int, axes: tuple[str, str], dtype, param_dtype, name: str | None = None,
           kernel_init=_xavier) -> nn.Dense:
    # name=None inside setup(): the attribute name is the param name.
    return nn.Dense(features, dtype=dtype, param_dtype=param_dtype, name=name,
                    kernel_init=nn.with_logical_partitioning(kernel_init, axes),
                    bias_init=nn.with_logical_partitioning(_zeros, (axes[1],)))


def _layer_norm(dtype, param_dtype, name: str | None, affine: bool) -> nn.LayerNorm:
    # Two-pass variance in float32, as torch.nn.LayerNorm.
    return nn.LayerNorm(epsilon=LN_EPS, dtype=dtype, param_dtype=param_dtype, use_bias=affine,
                        use_scale=affine, use_fast_variance=False, name=name,
                        scale_init=nn.with_logical_partitioning(nn.initializers.ones_init(), ("fm_embed",)),
                        bias_init=nn.with_logical_partitioning(_zeros, ("fm_embed",)))


def timestep_embedding(t: jax.Array, dim: int = FREQ_DIM, max_period: float = MAX_PERIOD) -> jax.Array:
    """[N] -> [N, dim] float32 features cat(cos, sin)(t·freq); t in [0, 1] is used as is (no ×1000)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
    return emb


def _modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    return x * (1 + scale) + shift


class TimestepEmbedder(nn.Module):
    dim: int
    dtype: Any
    param_dtype: Any

    @nn.compact
    def __call__(self, t: jax.Array) -> jax.Array:
        init = nn.initializers.normal(0.02)
        h = timestep_embedding(t).astype(self.dtype)
        h = _dense(self.dim, ("fm_freq", "fm_mlp"), self.dtype, self.param_dtype, "mlp_0", init)(h)
        h = _dense(self.dim, ("fm_mlp", "fm_embed"), self.dtype, self.param_dtype, "mlp_2", init)(nn.silu(h))
        return nn.with_logical_constraint(h, _ACT_EMBED)


class ResBlock(nn.Module):
    """``x + gate · MLP(modulate(LN(x), shift, scale))`` with (shift, scale, gate) = ``modulation(y)``."""

    dim: int
    mlp_dim: int
    dtype: Any
    param_dtype: Any

    def setup(self):
        dt, pdt = self.dtype, self.param_dtype
        self.adaLN_modulation_1 = _dense(3 * self.dim, ("fm_embed", "fm_modulation"), dt, pdt, kernel_init=_zeros)
        self.in_ln = _layer_norm(dt, pdt, None, True)
        self.mlp_0 = _dense(self.mlp_dim, ("fm_embed", "fm_mlp"), dt, pdt)
        self.mlp_2 = _dense(self.dim, ("fm_mlp", "fm_embed"), dt, pdt)

    def modulation(self, y: jax.Array) -> jax.Array:
        """[..., dim] -> [..., 3·dim] = cat(shift, scale, gate); depends on (t, c) only, not on x."""
        return self.adaLN_modulation_1(nn.silu(y))

    def modulated(self, x: jax.Array, mod: jax.Array) -> jax.Array:
        # Every matmul's input and output pinned (here and in FinalLayer): left to XLA's sharding propagation,
        # a (data, fsdp, tensor) mesh with 32-128 rows per loss chunk computed some batch shards wrong, in the
        # forward (mlp_2's output) and in the backward (the cotangents into mlp_0 and the final linear).
        # tests/sharding/test_mesh.py holds that case.
        shift, scale, gate = jnp.split(mod, 3, axis=-1)
        h = nn.with_logical_constraint(_modulate(self.in_ln(x), shift, scale), _ACT_EMBED)
        h = nn.with_logical_constraint(nn.silu(self.mlp_0(h)), ("activation_batch", "activation_mlp"))
        h = nn.with_logical_constraint(self.mlp_2(h), _ACT_EMBED)
        return nn.with_logical_constraint(x + gate * h, _ACT_EMBED)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self.modulated(x, self.modulation(y))


class FinalLayer(nn.Module):
    dim: int
    token_dim: int
    dtype: Any
    param_dtype: Any

    def setup(self):
        dt, pdt = self.dtype, self.param_dtype
        self.adaLN_modulation_1 = _dense(2 * self.dim, ("fm_embed", "fm_modulation"), dt, pdt, kernel_init=_zeros)
        self.norm_final = _layer_norm(dt, pdt, None, False)
        self.linear = _dense(self.token_dim, ("fm_embed", "token"), dt, pdt, kernel_init=_zeros)

    def modulation(self, y: jax.Array) -> jax.Array:
        """[..., dim] -> [..., 2·dim] = cat(shift, scale)."""
        return self.adaLN_modulation_1(nn.silu(y))

    def modulated(self, x: jax.Array, mod: jax.Array) -> jax.Array:
        shift, scale = jnp.split(mod, 2, axis=-1)
        v = self.linear(nn.with_logical_constraint(_modulate(self.norm_final(x), shift, scale), _ACT_EMBED))
        return nn.with_logical_constraint(v, ("activation_batch", "activation_token"))

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return self.modulated(x, self.modulation(y))


class SimpleMLPAdaLN(nn.Module):
    """The released head network: ``v = net(x [N, token_dim], t [N], c [N, cond_dim])``.

    It is split along what each part depends on: ``embed_condition(c)`` (c only), ``modulations(t, c_emb)``
    (every block's and the final layer's adaLN shift/scale/gate: t and c, not x) and
    ``velocity_with_modulations(x, mods)`` (input_proj → blocks → final layer). ``velocity`` and ``__call__``
    are exactly their composition. While one token is sampled c is fixed and t runs over a static grid, so
    a sampler can compute the modulations of all steps in one matmul per block
    (``fm_sampler.sample_head``).
    """

    token_dim: int = 64
    dim: int = 1536
    num_layers: int = 12
    mlp_ratio: float = 1.0
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        dtype, pdt = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
        self.time_embed = TimestepEmbedder(self.dim, dtype, pdt)
        self.cond_embed = _dense(self.dim, ("embed", "fm_embed"), dtype, pdt)
        self.input_proj = _dense(self.dim, ("token", "fm_embed"), dtype, pdt)
        self.res_blocks = [ResBlock(self.dim, int(self.dim * self.mlp_ratio), dtype, pdt)
                           for _ in range(self.num_layers)]
        self.final_layer = FinalLayer(self.dim, self.token_dim, dtype, pdt)

    def embed_condition(self, c: jax.Array) -> jax.Array:
        """[N, cond_dim] -> [N, dim] in the compute dtype."""
        return nn.with_logical_constraint(self.cond_embed(c), _ACT_EMBED)

    def modulations(self, t: jax.Array, c_emb: jax.Array) -> tuple[list[jax.Array], jax.Array]:
        """(per block [..., 3·dim], final layer [..., 2·dim]) for y = time_embed(t) + c_emb.

        ``t`` has any shape T; ``c_emb`` [..., dim] broadcasts against T + (dim,): t [N] with c_emb [N, dim]
        gives one row per (t, c) pair, t [S, 1] with c_emb [N, dim] gives the [S, N, ·] table of a step grid.
        """
        t_emb = self.time_embed(t.reshape(-1)).reshape(*t.shape, self.dim)
        y = t_emb + c_emb
        return [block.modulation(y) for block in self.res_blocks], self.final_layer.modulation(y)

    def velocity_with_modulations(self, x: jax.Array, mods: tuple[list[jax.Array], jax.Array]) -> jax.Array:
        """v [N, token_dim] (compute dtype) from x [N, token_dim] and ``modulations`` rows [N, ·]."""
        block_mods, final_mod = mods
        h = nn.with_logical_constraint(self.input_proj(x), _ACT_EMBED)
        for block, mod in zip(self.res_blocks, block_mods, strict=True):
            h = block.modulated(h, mod)
        return self.final_layer.modulated(h, final_mod)

    def velocity(self, x: jax.Array, t: jax.Array, c_emb: jax.Array) -> jax.Array:
        """v [N, token_dim] (compute dtype) from the precomputed condition embedding."""
        return self.velocity_with_modulations(x, self.modulations(t, c_emb))

    def __call__(self, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        return self.velocity(x, t, self.embed_condition(c))


def flow_matching_loss(net_fn: VelocityFn, target: jax.Array, c: jax.Array, mask: jax.Array | None = None, *,
                       batch_mul: int = 1, key: jax.Array | None = None, noise: jax.Array | None = None,
                       u: jax.Array | None = None) -> jax.Array:
    """Scalar float32 flow-matching loss: x_t = t·x1 + (1 - t)·noise, MSE of the velocity against x1 - noise.

    Rows of (target, c, mask) are tiled ``batch_mul`` times as whole blocks; ``noise`` [N·batch_mul, D] and
    ``u`` [N·batch_mul] (t = sigmoid(u)) are injected or drawn from ``key``.
    """
    x1 = jax.lax.stop_gradient(jnp.tile(target.astype(jnp.float32), (batch_mul, 1)))
    c = jnp.tile(c, (batch_mul, 1))
    n, d = x1.shape
    if (noise is None or u is None) and key is None:
        raise ValueError("flow_matching_loss needs `key` unless both `noise` and `u` are given")
    k_noise, k_u = jax.random.split(key) if key is not None else (None, None)
    noise = jax.random.normal(k_noise, (n, d)) if noise is None else noise.astype(jnp.float32)
    u = jax.random.normal(k_u, (n,)) if u is None else u.astype(jnp.float32)
    if noise.shape != (n, d) or u.shape != (n,):
        raise ValueError(f"noise {noise.shape} / u {u.shape} must be {(n, d)} / {(n,)} (rows × batch_mul)")
    per_row = flow_matching_errors(net_fn, x1, c, noise, u)
    if mask is None:
        return jnp.mean(per_row)
    mask = jnp.tile(mask.astype(jnp.float32), batch_mul)
    return jnp.sum(per_row * mask) / (jnp.sum(mask) + 1e-8)


def flow_matching_errors(net_fn: VelocityFn, x1: jax.Array, c: jax.Array, noise: jax.Array,
                         u: jax.Array) -> jax.Array:
    """Per-row float32 squared velocity error mean_d (v(x_t, t, c) - (x1 - noise))², t = sigmoid(u)."""
    t = 1 / (1 + jnp.exp(-u))  # official op order rather than jax.nn.sigmoid
    x_t = t[:, None] * x1 + (1 - t[:, None]) * noise
    v = net_fn(x_t, t, c).astype(jnp.float32)
    return jnp.mean((v - (x1 - noise)) ** 2, axis=-1)


def head_module(head_params, dtype: Any = jnp.float32) -> SimpleMLPAdaLN:
    """The ``SimpleMLPAdaLN`` whose params are ``head_params`` (e.g. a model's ``image_head`` subtree)."""
    dim = head_params["input_proj"]["kernel"].shape[-1]
    return SimpleMLPAdaLN(token_dim=head_params["final_layer"]["linear"]["kernel"].shape[-1], dim=dim,
                          num_layers=sum(1 for k in head_params if k.startswith("res_blocks_")),
                          mlp_ratio=head_params["res_blocks_0"]["mlp_0"]["kernel"].shape[-1] / dim, dtype=dtype)
