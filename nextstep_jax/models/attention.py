"""One attention entry point: masks, the XLA kernel (and cuDNN via jax.nn on GPU), KV-cache update.

Keys and values are heads-major, [B, KV, S, D] (the cache too, as in the reference): the attention dots take
(B, KV) as batch dimensions and read the cached keys in place rather than transposing them at every step.

Masks are boolean [B, 1, T, S] built once per forward and shared by every layer. Masked scores get the
finite float32 minimum (not -inf), so a fully masked query row (a left pad) yields a uniform, finite
softmax instead of NaN, as in the reference (golden README "Conventions").
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

MASK_VALUE = float(jnp.finfo(jnp.float32).min)


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


def dot_product_attention(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, mask: jnp.ndarray,
                          impl: str = "xla") -> jnp.ndarray:
    """q [B, T, H, D], k/v [B, KV, S, D] (GQA: kv head j serves query heads j*G .. j*G+G-1),
    mask [B, 1, T, S] bool -> [B, T, H, D]. Scores and softmax in float32."""
    b, t, h, d = q.shape
    kv = k.shape[1]
    if impl == "auto":
        # On GPU let jax.nn pick cuDNN flash attention when it supports the shapes/dtypes (else its XLA path);
        # elsewhere our XLA path, which keeps float32 scores and the reference's finite mask value.
        impl = "jax" if jax.default_backend() == "gpu" else "xla"
    if impl in ("cudnn", "jax"):
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)
        return jax.nn.dot_product_attention(q, k, v, mask=mask, implementation="cudnn" if impl == "cudnn" else None)
    if impl != "xla":
        raise ValueError(f"unknown attention_impl {impl!r}; use 'auto', 'xla', 'cudnn' or 'jax'")
    qg = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bksd->bkgts", qg, k, preferred_element_type=jnp.float32) / jnp.sqrt(
        jnp.float32(d))
    scores = jnp.where(mask[:, :, None], scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def update_cache(cache_k: jnp.ndarray, cache_v: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray,
                 index: jnp.ndarray):
    """Write k/v [B, KV, T, D] into the static cache [B, KV, S, D] at slot ``index``."""
    start = (0, 0, index, 0)
    return (jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start),
            jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start))
