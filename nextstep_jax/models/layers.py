"""Building blocks of the Qwen2-style backbone: RMSNorm, rotary embedding, SwiGLU MLP, dtype helpers."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

Dtype = Any


def as_dtype(dtype: Dtype) -> jnp.dtype:
    return jnp.dtype(dtype)


def partitioned(init, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, names)


def normal_init(stddev: float = 0.02):
    return nn.initializers.normal(stddev)


class RMSNorm(nn.Module):
    """Qwen2 RMSNorm with the reference rounding (REFERENCE §3.3): normalise in float32, cast back to the
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
            return nn.DenseGeneral(features, use_bias=self.use_bias, dtype=self.dtype,
                                   param_dtype=self.param_dtype, kernel_init=partitioned(normal_init(), names),
                                   bias_init=partitioned(nn.initializers.zeros, names[1:]), name=name)

        if self.fused:
            gate_up = dense((2, self.intermediate_size), ("embed", "gate_up", "mlp"), "gate_up_proj")(x)
            gate, up = gate_up[..., 0, :], gate_up[..., 1, :]
        else:
            gate = dense(self.intermediate_size, ("embed", "mlp"), "gate_proj")(x)
            up = dense(self.intermediate_size, ("embed", "mlp"), "up_proj")(x)
        h = nn.with_logical_constraint(nn.silu(gate) * up, ("activation_batch", "activation_length",
                                                            "activation_mlp"))
        return dense(self.hidden_size, ("mlp", "embed"), "down_proj")(h)
