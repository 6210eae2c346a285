"""Building blocks of the Qwen2-style backbone: projections, RMSNorm, rotary embedding, SwiGLU MLP, dtype
helpers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from nextstep_jax.sharding import constrain

Dtype = Any


def as_dtype(dtype: Dtype) -> jnp.dtype:
    return jnp.dtype(dtype)


def partitioned(init, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, names)


def normal_init(stddev: float = 0.02):
    return nn.initializers.normal(stddev)


class Projection(nn.Module):
    """``x [..., *in_shape] -> [..., *features]`` contracting the last ``len(in_shape)`` axes of x.

    The kernel is created in its real shape ``in_shape + features`` with one logical name per axis
    (``names``; the bias takes the names of ``features``). ``nn.DenseGeneral`` initialises a flattened
    2-D kernel instead, which a live rank-3 sharding constraint rejects. Same values as DenseGeneral for
    the same key (the normal initialiser fills row-major either way) and the same param names.
    """

    features: tuple[int, ...]
    names: tuple[str | None, ...]
    in_axes: int = 1
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        in_shape = x.shape[-self.in_axes:]
        kernel = self.param("kernel", partitioned(normal_init(), self.names), (*in_shape, *self.features),
                            self.param_dtype)
        y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                                ((tuple(range(x.ndim - self.in_axes, x.ndim)), tuple(range(self.in_axes))),
                                 ((), ())))
        if self.use_bias:
            bias = self.param("bias", partitioned(nn.initializers.zeros, self.names[self.in_axes:]),
                              self.features, self.param_dtype)
            y = y + bias.astype(self.dtype)
        return y


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm with the official rounding (``modeling_llama.py``): normalise in float32, cast back to the
    input dtype, then multiply by the weight."""

    eps: float = 1e-5
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        scale = self.param("scale", partitioned(nn.initializers.ones, ("norm",)), (x.shape[-1],),
                           self.param_dtype)
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return scale.astype(x.dtype) * normed.astype(x.dtype)


def rope_tables(positions: jnp.ndarray, head_dim: int, theta: float, dtype: Dtype):
    """cos/sin [..., T, head_dim] for integer ``positions`` [..., T]; angles in float32, halves duplicated."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq
    emb = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate-half convention. x [B, T, heads, D]; cos/sin [B, T, D]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); ``fused``: gate and up as one [embed, 2, mlp] kernel."""

    hidden_size: int
    intermediate_size: int
    use_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    fused: bool = False

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        def dense(features, names, name):
            return Projection(features, names, use_bias=self.use_bias, dtype=self.dtype,
                              param_dtype=self.param_dtype, name=name)

        act_mlp = ("activation_batch", "activation_length", "activation_mlp")
        if self.fused:
            gate_up = dense((2, self.intermediate_size), ("embed", "gate_up", "mlp"), "gate_up_proj")(x)
            gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        else:
            gate = dense((self.intermediate_size,), ("embed", "mlp"), "gate_proj")(x)
            up = dense((self.intermediate_size,), ("embed", "mlp"), "up_proj")(x)
        h = constrain(nn.silu(constrain(gate, act_mlp)) * constrain(up, act_mlp), act_mlp)
        return dense((self.hidden_size,), ("mlp", "embed"), "down_proj")(h)
