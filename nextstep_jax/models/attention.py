"""One attention entry point: what each query may see (``Masking``), the kernel chosen per backend, the XLA
kernel, and the KV-cache update.

Kernels (``model.attention_impl``): ``splash`` (Pallas splash attention, TPU), ``cudnn`` (cuDNN flash attention
through ``jax.nn.dot_product_attention``, GPU), ``xla`` (ours, dense mask). ``auto`` picks splash on TPU, cuDNN
on GPU in a 16-bit compute dtype, XLA elsewhere. Decoding with a KV cache always runs the XLA kernel: one query
row against a static cache is a matrix-vector product, not what the flash kernels are built for. The platform
is the one of the mesh in context (an ahead-of-time TPU compile on a CPU host targets TPU), else JAX's default.

What a query sees, for every kernel: keys at or before its slot (causal by slot, so packed documents with
restarted positions stay causal), of its own document, that hold a real token. The XLA kernel takes this as a
boolean [B, 1, T, S] mask built once per forward, whose masked scores get the finite float32 minimum (not
-inf), so a fully masked query row (a left pad) yields a uniform, finite softmax instead of NaN, as in the
reference (golden README "Conventions"). The flash kernels take a causal mask plus one segment id per slot
(``Masking.kernel_segments``). The two agree on every real query and differ only on padding queries, whose
outputs nothing reads: a fully masked row would divide by zero in a flash kernel, so there padding attends to
padding.

Keys and values are heads-major, [B, KV, S, D] (the cache too, as in the reference): the attention dots take
(B, KV) as batch dimensions and read the cached keys in place rather than transposing them at every step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from nextstep_jax.models.layers import sequence_is_split

MASK_VALUE = float(jnp.finfo(jnp.float32).min)
KERNELS = ("auto", "xla", "splash", "cudnn")
PADDING_SEGMENT = -1  # kernel segment id of padding slots: padding attends to padding only


def attention_mask(q_slots: jnp.ndarray, kv_valid: jnp.ndarray, q_segments: jnp.ndarray | None = None,
                   kv_segments: jnp.ndarray | None = None) -> jnp.ndarray:
    """Causal + key-padding (+ same-document) mask.

    q_slots: [B, T] or [T] absolute slot index of each query in the key sequence (causality is by slot,
    so packed documents with restarted positions stay causal); kv_valid: [B, S] bool, key slot holds a
    real token; segments: [B, T] / [B, S] document ids (queries only see keys of their own document).
    Returns [B, 1, T, S] bool.
    """
    b, s = kv_valid.shape
    q_slots = jnp.broadcast_to(q_slots, (b, q_slots.shape[-1]))
    kv_slots = jnp.arange(s, dtype=q_slots.dtype)
    mask = (kv_slots[None, None, :] <= q_slots[:, :, None]) & kv_valid[:, None, :].astype(bool)
    if q_segments is not None:
        mask &= q_segments[:, :, None] == kv_segments[:, None, :]
    return mask[:, None]


@struct.dataclass
class Masking:
    """What each query may see, before a kernel materialises it.

    q_slots [T] or [B, T]: slot of each query in the key sequence; kv_valid [B, S]: the key slot holds a real
    token; segment_ids [B, T] (full forward only, S == T): document ids. ``all_valid`` (static): no padding
    and one document per row, so causality alone decides.
    """

    q_slots: jnp.ndarray
    kv_valid: jnp.ndarray
    segment_ids: jnp.ndarray | None = None
    all_valid: bool = struct.field(pytree_node=False, default=False)

    @classmethod
    def documents(cls, batch: int, length: int, valid: jnp.ndarray | None = None,
                  segment_ids: jnp.ndarray | None = None) -> "Masking":
        """A full forward over [batch, length] slots: ``valid`` [B, T] (1 = real token) and/or packed
        documents ``segment_ids`` [B, T] (0 = padding)."""
        kv_valid = jnp.ones((batch, length), bool) if valid is None else valid.astype(bool)
        if segment_ids is not None:
            kv_valid &= segment_ids > 0
        return cls(jnp.arange(length, dtype=jnp.int32), kv_valid, segment_ids,
                   all_valid=valid is None and segment_ids is None)

    def dense(self) -> jnp.ndarray:
        """The XLA kernel's boolean mask [B, 1, T, S]."""
        return attention_mask(self.q_slots, self.kv_valid, self.segment_ids, self.segment_ids)

    def kernel_segments(self) -> jnp.ndarray | None:
        """Segment ids [B, T] for the flash kernels (with their causal mask): the document of a real token,
        ``PADDING_SEGMENT`` for padding; None when causality alone decides."""
        if self.all_valid:
            return None
        ids = jnp.ones(self.kv_valid.shape, jnp.int32) if self.segment_ids is None else self.segment_ids
        return jnp.where(self.kv_valid, ids.astype(jnp.int32), PADDING_SEGMENT)


def target_platform() -> str:
    """The platform the program is compiled for: the mesh in context's, else JAX's default backend."""
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.abstract_device is not None:
        return mesh.abstract_device.platform
    return jax.default_backend()


def select_kernel(requested: str, *, decoding: bool, dtype, platform: str | None = None) -> str:
    """The kernel that runs for ``model.attention_impl=requested`` (see the module docstring)."""
    if requested not in KERNELS:
        raise ValueError(f"model.attention_impl={requested!r}: expected one of {KERNELS}")
    if decoding:
        return "xla"
    platform = platform or target_platform()
    if requested == "auto":
        if platform == "tpu":
            return "splash"
        sixteen_bit = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
        return "cudnn" if platform == "gpu" and sixteen_bit else "xla"
    if requested == "cudnn" and platform != "gpu":
        raise ValueError(f"model.attention_impl='cudnn' needs a GPU; this program is for {platform!r} "
                         "(use 'auto' or 'xla')")
    return requested


def xla_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray) -> jnp.ndarray:
    """q [B, T, H, D], k/v [B, KV, S, D] (GQA: kv head j serves query heads j*G .. j*G+G-1),
    mask [B, 1, T, S] bool -> [B, T, H, D]. Scores and softmax in float32.

    Laid out for XLA's batched matmuls: the queries of one kv head as one [G·T, D] block (G, T kept apart
    when the mesh splits the length), so the scores are [B, KV, G·T, S] and no matmul transposes them; only
    q and the output, S/D times smaller, are transposed. The probabilities are recomputed in the backward
    pass rather than kept, as the flash kernels do: a layer saves q, k, v instead of B·H·T·S floats (under
    a layer scan, a stack of them filled afresh every step, which cost more than the recomputed scores)."""
    b, t, h, d = q.shape
    kv, s = k.shape[1], k.shape[2]
    g = h // kv
    qh = q.reshape(b, t, kv, g, d).transpose(0, 2, 3, 1, 4)  # [B, KV, G, T, D]
    if not sequence_is_split():
        qh = qh.reshape(b, kv, g * t, d)

    def attend_heads_major(qh, k, v, mask):
        scores = jnp.einsum("bk...d,bksd->bk...s", qh, k, preferred_element_type=jnp.float32) / jnp.sqrt(
            jnp.float32(d))
        mask = jnp.broadcast_to(mask[:, :, None], (b, 1, g, t, s)).reshape(b, 1, *qh.shape[2:-1], s)
        probs = jax.nn.softmax(jnp.where(mask, scores, MASK_VALUE), axis=-1).astype(v.dtype)
        return jnp.einsum("bk...s,bksd->bk...d", probs, v)

    out = jax.checkpoint(attend_heads_major)(qh, k, v, mask)
    return out.reshape(b, kv, g, t, d).transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def kernel_inputs(masking: Masking, kernel: str):
    """What ``attend`` takes for ``kernel``: the dense mask (xla) or the kernel segment ids (flash kernels).
    Built once per forward and shared by every layer."""
    return masking.dense() if kernel == "xla" else masking.kernel_segments()


def attend(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, inputs, kernel: str, *, block_q: int = 512,
           block_kv: int = 512) -> jnp.ndarray:
    """q [B, T, H, D], k/v [B, KV, S, D] -> [B, T, H, D] with a kernel of ``select_kernel`` and its
    ``kernel_inputs``; ``block_q``/``block_kv``: splash tile sizes."""
    if kernel == "xla":
        return xla_attention(q, k, v, inputs)
    from nextstep_jax.models import attention_kernels

    if kernel == "splash":
        return attention_kernels.splash_attention(q, k, v, inputs, block_q=block_q, block_kv=block_kv)
    if kernel == "cudnn":
        return attention_kernels.cudnn_attention(q, k, v, inputs)
    raise ValueError(f"unknown attention kernel {kernel!r}")


def update_cache(cache_k: jnp.ndarray, cache_v: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                 index: jnp.ndarray):
    """Write k/v [B, KV, T, D] into the static cache [B, KV, S, D] at slot ``index``."""
    start = (0, 0, index, 0)
    return (jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start),
            jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start))
