"""Turn golden (PyTorch-layout) latents into the position-aligned image tokens our model takes."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from nextstep_jax.latents import patchify
from nextstep_jax.models.nextstep import scatter_image_tokens


def tokens_of(latents_nchw: list[np.ndarray], p: int) -> list[np.ndarray]:
    """Each [n, C, H, W] latent -> [n·(H/p)·(W/p), C·p·p] tokens, images in order."""
    return [np.asarray(patchify(jnp.asarray(lat.transpose(0, 2, 3, 1)), p)).reshape(-1, lat.shape[1] * p * p)
            for lat in latents_nchw]


def image_tokens(cfg, input_ids: np.ndarray, latents_nchw: list[np.ndarray]) -> jnp.ndarray:
    tokens = np.concatenate(tokens_of(latents_nchw, cfg.latent_patch_size))
    return scatter_image_tokens(jnp.asarray(input_ids), jnp.asarray(tokens), cfg.image_placeholder_id)


def image_loss_mask(cfg, input_ids: np.ndarray, latents_nchw: list[np.ndarray], latents_mask) -> jnp.ndarray:
    """Per-image 0/1 mask broadcast to each image's placeholder positions -> [B, T]."""
    per_image = []
    for lat in latents_nchw:
        per_image += [lat.shape[2] * lat.shape[3] // cfg.latent_patch_size ** 2] * lat.shape[0]
    per_token = np.repeat(np.asarray(latents_mask, np.float32), per_image)[:, None]
    return scatter_image_tokens(jnp.asarray(input_ids), jnp.asarray(per_token), cfg.image_placeholder_id)[..., 0]
