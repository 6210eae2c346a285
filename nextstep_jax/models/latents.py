"""Patchify / unpatchify between NHWC latents and 64-d image tokens (REFERENCE §4.1).

Token index = row-major over the patch grid; feature index = c·p² + dy·p + dx (channel outer, the p×p
patch position inner, dy before dx), matching the official NCHW implementation.
"""

from __future__ import annotations

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
