"""The loss terms of image-tokenizer (VAE) training, as plain functions of arrays (float32).

    reconstruction_terms(reconstruction, target)    {"l1": mean |r|, "l2": mean r²}, r = reconstruction - target
    kl_divergence(mean, logvar)                     KL(N(mean, e^logvar) || N(0, 1)), mean over latent elements
    draw_latent_noise(keys, shape, gamma)           NextStep's noise regularisation: (alpha [B], eps [B, ...])
    add_latent_noise(z, alpha, eps)                 z + alpha·eps, alpha broadcast per image
    lpips_distance(feats_a, feats_b, lin_weights)   the LPIPS distance of two feature pyramids, per image
    hinge_discriminator_loss(real, fake)            ½(mean relu(1 - D(x)) + mean relu(1 + D(x̂)))
    generator_adversarial_loss(fake)                -mean D(x̂)

Every mean is over elements (pixels x channels, latent elements), not a sum, so a weight means the same at
any resolution. Where each term applies in the step (``training/vae_task.py``): the KL on the encoder's raw
Gaussian posterior (mean BEFORE the per-token normalisation, the clamped logvar), the noise on the latent the
decoder consumes (the normalised, possibly sampled one), the reconstruction, perceptual and adversarial terms
on the decoder output in [-1, 1] (not clamped).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

LPIPS_EPS = 1e-10  # LPIPS adds it to the feature norm before dividing


def reconstruction_terms(reconstruction: jax.Array, target: jax.Array) -> dict[str, jax.Array]:
    r = reconstruction.astype(jnp.float32) - target.astype(jnp.float32)
    return {"l1": jnp.mean(jnp.abs(r)), "l2": jnp.mean(jnp.square(r))}


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL of the diagonal Gaussian posterior from the standard normal, averaged over latent elements."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    return jnp.mean(0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar))


def draw_latent_noise(keys: jax.Array, shape: Sequence[int], gamma: float) -> tuple[jax.Array, jax.Array]:
    """One strength alpha ~ U(0, gamma) and one eps ~ N(0, I) of ``shape`` per image, each image from its
    own key (``keys`` [B]), so a draw does not depend on how the batch is split over devices."""
    def one(key):
        k_alpha, k_eps = jax.random.split(key)
        return gamma * jax.random.uniform(k_alpha, (), jnp.float32), jax.random.normal(k_eps, tuple(shape),
                                                                                      jnp.float32)

    return jax.vmap(one)(keys)


def add_latent_noise(z: jax.Array, alpha: jax.Array, eps: jax.Array) -> jax.Array:
    """NextStep's noise regularisation ``z + alpha·eps`` (alpha [B], eps like z [B, h, w, c])."""
    return z + alpha.reshape((-1,) + (1,) * (z.ndim - 1)) * eps


def _unit_channels(f: jax.Array) -> jax.Array:
    f = f.astype(jnp.float32)
    return f / (jnp.sqrt(jnp.sum(jnp.square(f), axis=-1, keepdims=True)) + LPIPS_EPS)


def lpips_distance(feats_a: Sequence[jax.Array], feats_b: Sequence[jax.Array],
                   lin_weights: Sequence[jax.Array] | None = None) -> jax.Array:
    """LPIPS of two images' feature pyramids (lists of NHWC maps, one per tap) -> [N].

    Per tap: unit-normalise each position's channel vector, square the difference, weight the channels by
    the tap's linear head (``lin_weights[k]`` [C_k], non-negative in the released heads; None = all 1,
    a plain normalised-feature distance), sum the channels, average the positions; sum over taps."""
    total = 0.0
    for k, (a, b) in enumerate(zip(feats_a, feats_b, strict=True)):
        d = jnp.square(_unit_channels(a) - _unit_channels(b))
        w = jnp.ones(d.shape[-1], jnp.float32) if lin_weights is None else lin_weights[k].astype(jnp.float32)
        total = total + jnp.mean(jnp.sum(d * w, axis=-1), axis=(1, 2))
    return total


def hinge_discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
    real, fake = logits_real.astype(jnp.float32), logits_fake.astype(jnp.float32)
    return 0.5 * (jnp.mean(jax.nn.relu(1.0 - real)) + jnp.mean(jax.nn.relu(1.0 + fake)))


def generator_adversarial_loss(logits_fake: jax.Array) -> jax.Array:
    return -jnp.mean(logits_fake.astype(jnp.float32))
