"""Building blocks of the Qwen2-style backbone: projections, RMSNorm, rotary embedding, SwiGLU MLP, dtype
helpers."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from nextstep_jax.sharding import constrain, logical_to_mesh_spec

Dtype = Any


def as_dtype(dtype: Dtype) -> jnp.dtype:
    return jnp.dtype(dtype)


def partitioned(init, names: tuple[str | None, ...]):
    return nn.with_logical_partitioning(init, names)


def normal_init(stddev: float = 0.02):
    return nn.initializers.normal(stddev)


def sequence_is_split() -> bool:
    """Whether the mesh in context splits activations along their length (sequence parallelism). Then the
    rows of a device in a [batch·length, ...] reshape are not one contiguous block and GSPMD would gather
    them, so the layers that merge the length with another axis keep it separate instead."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return False
    axes = logical_to_mesh_spec(("activation_length",), rules)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
    return math.prod(mesh.shape[a] for a in axes) > 1


class Projection(nn.Module):
    """``x [..., *in_shape] -> [..., *features]`` contracting the last ``len(in_shape)`` axes of x.

    The kernel is created in its real shape ``in_shape + features`` with one logical name per axis
    (``names``; the bias takes the names of ``features``). ``nn.DenseGeneral`` initialises a flattened
    2-D kernel instead, which a live rank-3 sharding constraint rejects. Same values as DenseGeneral for
    the same key (the normal initialiser fills row-major either way) and the same param names.

    The product runs as one 2-D matmul, [rows, in] x [in, out], unless the length axis is split
    (``sequence_is_split``): the weight gradient then contracts one row axis, while with several (batch,
    length) XLA CPU first writes the output gradient transposed, a strided copy that took a quarter of the
    training step.
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
        x, kernel = x.astype(self.dtype), kernel.astype(self.dtype)
        rows = x.shape[:-self.in_axes]
        if len(rows) > 1 and not sequence_is_split():
            fan_in = math.prod(in_shape)
            y = jnp.dot(x.reshape(-1, fan_in), kernel.reshape(fan_in, -1)).reshape(*rows, *self.features)
        else:
            y = jax.lax.dot_general(x, kernel, ((tuple(range(len(rows), x.ndim)), tuple(range(self.in_axes))),
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
