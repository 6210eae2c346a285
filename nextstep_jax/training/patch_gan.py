"""The optional adversarial critic of VAE training: a PatchGAN discriminator.

The N-layer PatchGAN of pix2pix (Isola et al. 2017), the critic VQGAN and the latent-diffusion autoencoders
train their tokenizers with: a stack of 4x4 convs that halves the resolution ``layers`` times and ends in one
logit per overlapping patch (70x70 px receptive field with 3 layers). It judges local texture and edge
sharpness, exactly what L1/L2 reconstruction blurs, and costs little next to the VAE. One change: GroupNorm
(32 groups) instead of BatchNorm, so the critic has no batch statistics to carry in the train state and its
output for an image does not depend on the rest of the batch or on how the batch is split over devices.
"""

from __future__ import annotations

from flax import linen as nn
import jax.numpy as jnp

LEAKY_SLOPE = 0.2
NORM_GROUPS = 32


class PatchDiscriminator(nn.Module):
    """Images [N, H, W, 3] in [-1, 1] -> patch logits [N, h, w, 1] (float32)."""

    channels: int = 64
    layers: int = 3

    @nn.compact
    def __call__(self, x):
        init = nn.initializers.normal(0.02)  # pix2pix's init
        conv = lambda c, stride, name: nn.Conv(c, (4, 4), strides=(stride, stride), padding=((1, 1), (1, 1)),
                                               kernel_init=init, name=name)
        h = nn.leaky_relu(conv(self.channels, 2, "conv_0")(x.astype(jnp.float32)), LEAKY_SLOPE)
        for i in range(1, self.layers + 1):
            c = self.channels * min(2**i, 8)
            h = conv(c, 2 if i < self.layers else 1, f"conv_{i}")(h)
            h = nn.leaky_relu(nn.GroupNorm(NORM_GROUPS, epsilon=1e-5, name=f"norm_{i}")(h), LEAKY_SLOPE)
        return conv(1, 1, "logits")(h)
