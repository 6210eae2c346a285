"""The flash attention kernels behind ``attention.attend``: Pallas splash attention (TPU) and cuDNN flash attention
(GPU). Both take a causal mask plus one segment id per slot (``Masking.kernel_segments``: same id = may attend)
instead of a dense [B, 1, T, S] mask, and never materialise the [T, S] scores.

Splash is a per-example kernel: it runs under ``shard_map`` with the batch split like ``activation_batch`` and the
KV heads (else the query heads of a group) split like the heads, and each shard sees the whole sequence (a
``sequence``-sharded activation is gathered for the kernel). Off TPU it runs in the Pallas interpreter: slow, for
tests only.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import linen as nn
from jax.sharding import PartitionSpec

from nextstep_jax.models.attention import PADDING_SEGMENT, target_platform
from nextstep_jax.sharding import fit_spec, logical_to_mesh_spec

LANES = 128  # splash tiles are multiples of the TPU's 128 lanes


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def splash_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segments: jnp.ndarray | None, *,
                     block_q: int, block_kv: int) -> jnp.ndarray:
    """q [B, T, H, D], k/v [B, KV, T, D], segments [B, T] int32 or None -> [B, T, H, D] (causal self-attention;
    softmax in float32 inside the kernel). Tiles: ``block_q`` x ``block_kv`` (clipped to the sequence); a
    sequence the tiles do not divide is padded at the end (causality keeps real queries off the pads)."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    groups = h // kv
    bq, bkv = (min(block, _round_up(t, LANES)) for block in (block_q, block_kv))
    padded = _round_up(t, math.lcm(bq, bkv))
    q5 = (q * jnp.asarray(1.0 / math.sqrt(d), q.dtype)).reshape(b, t, kv, groups, d).transpose(0, 2, 3, 1, 4)
    if padded != t:
        extra = padded - t
        q5 = jnp.pad(q5, [(0, 0)] * 3 + [(0, extra), (0, 0)])
        k, v = (jnp.pad(x, [(0, 0), (0, 0), (0, extra), (0, 0)]) for x in (k, v))
        if segments is not None:
            segments = jnp.pad(segments, [(0, 0), (0, extra)], constant_values=PADDING_SEGMENT)
    interpret = target_platform() != "tpu"

    def kernel_call(q5, k, v, segments):
        from jax.experimental.pallas.ops.tpu import splash_attention as splash

        heads = q5.shape[2]
        mask = splash.MultiHeadMask([splash.CausalMask((padded, padded))] * heads)
        sizes = splash.BlockSizes(block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
                                  block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv)
        kernel = splash.make_splash_mqa_single_device(mask, block_sizes=sizes, interpret=interpret)
        if segments is None:
            per_head = lambda qh, kh, vh: kernel(qh, kh, vh)
            return jax.vmap(jax.vmap(per_head))(q5, k, v)
        per_head = lambda qh, kh, vh, s: kernel(qh, kh, vh, segment_ids=splash.SegmentIds(q=s, kv=s))
        return jax.vmap(jax.vmap(per_head, in_axes=(0, 0, 0, None)))(q5, k, v, segments)

    out = _per_shard(kernel_call, q5, k, v, segments)  # [B, KV, G, T', D]
    return out[:, :, :, :t].transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def _per_shard(fn, q5, k, v, segments):
    """``fn`` under ``shard_map`` over the mesh in context (directly without one): batch and heads split, the
    sequence whole."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = nn.get_logical_axis_rules()
    if mesh.empty or not rules:
        return fn(q5, k, v, segments)
    sizes = dict(mesh.shape)
    spec = lambda names, shape: fit_spec(logical_to_mesh_spec(names, rules), shape, sizes)
    q_spec = spec(("activation_batch", "activation_kv_heads", None, None, None), q5.shape)
    kv_spec = spec(("activation_batch", "activation_kv_heads", None, None), k.shape)
    if q_spec[1] is None:  # KV heads the head axes do not divide: split each group's query heads instead
        q_spec = spec(("activation_batch", None, "activation_heads", None, None), q5.shape)
    seg_spec = PartitionSpec(q_spec[0], None)
    if segments is None:
        return jax.shard_map(lambda q5, k, v: fn(q5, k, v, None), in_specs=(q_spec, kv_spec, kv_spec),
                             out_specs=q_spec, check_vma=False)(q5, k, v)
    return jax.shard_map(fn, in_specs=(q_spec, kv_spec, kv_spec, seg_spec), out_specs=q_spec,
                         check_vma=False)(q5, k, v, segments)


def cudnn_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, segments: jnp.ndarray | None, *,
                    implementation: str = "cudnn") -> jnp.ndarray:
    """q [B, T, H, D], k/v [B, KV, T, D], segments [B, T] or None -> [B, T, H, D] through
    ``jax.nn.dot_product_attention`` (causal; packed documents as a same-segment mask, which cuDNN adds as a
    bias). ``implementation="xla"`` runs the same call on any backend."""
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
    mask = None if segments is None else segments[:, None, :, None] == segments[:, None, None, :]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=True, implementation=implementation)
