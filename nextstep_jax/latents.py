"""Patchify / unpatchify between NHWC latents and 64-d image tokens (2x2 patches of the 16-channel latent).

Plain array code shared by the models (VAE, generation) and by the data pipeline (cached latents), so it
sits below both and imports neither. With numpy inputs patchify/unpatchify stay numpy.

Token index = row-major over the patch grid; feature index = c·p² + dy·p + dx (channel outer, the p×p
patch position inner, dy before dx), matching the official NCHW implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def patchify(latent: jnp.ndarray, p: int) -> jnp.ndarray:
    """[B, H, W, C] -> [B, (H/p)·(W/p), C·p·p]."""
    b, h, w, c = latent.shape
    if h % p or w % p:
        raise ValueError(f"latent spatial shape {(h, w)} is not divisible by patch size {p}")
    x = latent.reshape(b, h // p, p, w // p, p, c)
    x = x.transpose(0, 1, 3, 5, 2, 4)  # b, hi, wi, c, dy, dx
    return x.reshape(b, (h // p) * (w // p), c * p * p)


def unpatchify(tokens: jnp.ndarray, h: int, w: int, p: int) -> jnp.ndarray:
    """[B, h·w, C·p·p] -> [B, h·p, w·p, C]; ``h``, ``w`` are the grid in PATCH units (always explicit)."""
    b, n, f = tokens.shape
    if n != h * w:
        raise ValueError(f"{n} tokens do not fill a {h}x{w} patch grid")
    if f % (p * p):
        raise ValueError(f"token dim {f} is not a multiple of p*p={p * p}")
    c = f // (p * p)
    x = tokens.reshape(b, h, w, c, p, p)
    x = x.transpose(0, 1, 4, 2, 5, 3)  # b, hi, dy, wi, dx, c
    return x.reshape(b, h * p, w * p, c)


def normalize_tokens(tokens: jnp.ndarray, eps: float = 1e-6) -> jnp.ndarray:
    """Parameter-free LayerNorm over the last (token feature) axis, statistics in float32 with the biased
    variance, result in the input dtype. It is both the VAE's ``encoder_norm`` of every 64-d patch and the
    sampler's ``use_norm``, which is why sampled tokens land on the encoder's manifold."""
    x = tokens.astype(jnp.float32)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    return ((x - mean) * jax.lax.rsqrt(var + eps)).astype(tokens.dtype)
