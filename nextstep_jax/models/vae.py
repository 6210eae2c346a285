"""Flux-style AutoencoderKL image tokenizer with NextStep's latent normalisation (the official `modeling_flux_vae.py`).

NHWC everywhere: images [B, H, W, in_channels] in [-1, 1], VAE latents [B, H/f, W/f, z] with
f = 2**(len(ch_mult) - 1). Parameter names mirror the PyTorch keys (``down.0.block.1`` -> ``down_0/block_1``)
so the checkpoint mapping is a plain rename plus the OIHW -> HWIO kernel transpose.

Two latent spaces: the *VAE space* (what the decoder consumes, ``decode``) and the *model space* the
backbone sees, ``(z - shift_factor) * scaling_factor`` (``to_model_latents`` / ``from_model_latents``).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from nextstep_jax.latents import normalize_tokens, patchify, unpatchify
from nextstep_jax.sharding import constrain

NUM_GROUPS = 32
NORM_EPS = 1e-6
LATENT_NORM_EPS = 1e-6
LOGVAR_RANGE = (-30.0, 20.0)

ACTIVATION_AXES = ("activation_batch", None, None, "vae_channels")


def encoder_blocks(cfg) -> list[tuple[list[tuple[int, int]], bool]]:
    """Per resolution level i: ([(c_in, c_out) per ResnetBlock], has_downsample) — the official wiring."""
    levels, block_in = [], cfg.ch
    for i, mult in enumerate(cfg.ch_mult):
        blocks = []
        for _ in range(cfg.num_res_blocks):
            blocks.append((block_in, cfg.ch * mult))
            block_in = cfg.ch * mult
        levels.append((blocks, i != len(cfg.ch_mult) - 1))
    return levels


def decoder_blocks(cfg) -> list[tuple[list[tuple[int, int]], bool]]:
    """Indexed by resolution level i (= ``up_{i}``), built and run from the deepest level down."""
    levels, block_in = {}, cfg.ch * cfg.ch_mult[-1]
    for i in reversed(range(len(cfg.ch_mult))):
        blocks = []
        for _ in range(cfg.num_res_blocks + 1):
            blocks.append((block_in, cfg.ch * cfg.ch_mult[i]))
            block_in = cfg.ch * cfg.ch_mult[i]
        levels[i] = (blocks, i != 0)
    return [levels[i] for i in range(len(cfg.ch_mult))]


def downsample_factor(cfg) -> int:
    return 2 ** (len(cfg.ch_mult) - 1)


def _conv(features: int, kernel: int, dtype, name: str, stride: int = 1, padding=None,
          out_axis: str | None = "conv_out") -> nn.Conv:
    pad = kernel // 2
    return nn.Conv(
        features,
        (kernel, kernel),
        strides=(stride, stride),
        padding=padding if padding is not None else ((pad, pad), (pad, pad)),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=nn.with_logical_partitioning(nn.initializers.normal(0.02),
                                                 ("conv_height", "conv_width", "conv_in", out_axis)),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vae_channels",)),
        name=name,
    )


def _constrain(x):
    return constrain(x, ACTIVATION_AXES)


class GroupNorm(nn.Module):
    """torch.nn.GroupNorm(32, c, eps=1e-6): two-pass biased statistics and affine in float32."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        if c % NUM_GROUPS:
            raise ValueError(f"GroupNorm: {c} channels are not divisible into {NUM_GROUPS} groups")
        scale = self.param("scale", nn.with_logical_partitioning(nn.initializers.ones_init(), ("vae_channels",)),
                           (c,), jnp.float32)
        bias = self.param("bias", nn.with_logical_partitioning(nn.initializers.zeros_init(), ("vae_channels",)),
                          (c,), jnp.float32)
        g = x.astype(jnp.float32).reshape(b, h, w, NUM_GROUPS, c // NUM_GROUPS)
        mean = g.mean(axis=(1, 2, 4), keepdims=True)
        var = jnp.square(g - mean).mean(axis=(1, 2, 4), keepdims=True)
        y = ((g - mean) * jax.lax.rsqrt(var + NORM_EPS)).reshape(b, h, w, c)
        return (y * scale + bias).astype(self.dtype)


class ResnetBlock(nn.Module):
    out_channels: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = _conv(self.out_channels, 3, self.dtype, "conv1")(nn.swish(GroupNorm(self.dtype, name="norm1")(x)))
        h = _conv(self.out_channels, 3, self.dtype, "conv2")(nn.swish(GroupNorm(self.dtype, name="norm2")(h)))
        if x.shape[-1] != self.out_channels:
            x = _conv(self.out_channels, 1, self.dtype, "nin_shortcut")(x)
        return _constrain(x.astype(self.dtype) + h)


class AttnBlock(nn.Module):
    """Single-head self-attention over all H·W positions (scale 1/sqrt(c)); softmax in float32."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        n = GroupNorm(self.dtype, name="norm")(x)
        q, k, v = (_conv(c, 1, self.dtype, name)(n).reshape(b, h * w, c) for name in ("q", "k", "v"))
        logits = jnp.einsum("bqc,bkc->bqk", q, k, preferred_element_type=jnp.float32) / jnp.sqrt(c)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("bqk,bkc->bqc", probs, v).reshape(b, h, w, c)
        return x.astype(self.dtype) + _conv(c, 1, self.dtype, "proj_out")(out)


class Downsample(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        # Official: F.pad(x, (0, 1, 0, 1)) then a 3x3 stride-2 conv with padding 0 (asymmetric, right/bottom).
        return _conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding=((0, 1), (0, 1)))(x)


class Upsample(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return _conv(x.shape[-1], 3, self.dtype, "conv")(x)


class Level(nn.Module):
    """One resolution level: ``block_{j}`` ResnetBlocks, then an optional ``downsample``/``upsample``."""

    out_channels: tuple[int, ...]
    resample: str | None  # "down" | "up" | None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j, c in enumerate(self.out_channels):
            x = ResnetBlock(c, self.dtype, name=f"block_{j}")(x)
        if self.resample == "down":
            x = Downsample(self.dtype, name="downsample")(x)
        elif self.resample == "up":
            x = Upsample(self.dtype, name="upsample")(x)
        return x


class Mid(nn.Module):
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        x = ResnetBlock(c, self.dtype, name="block_1")(x)
        x = AttnBlock(self.dtype, name="attn_1")(x)
        return ResnetBlock(c, self.dtype, name="block_2")(x)


class Encoder(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, x):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        h = _conv(cfg.ch, 3, dtype, "conv_in")(x)
        for i, (blocks, down) in enumerate(encoder_blocks(cfg)):
            h = Level(tuple(co for _, co in blocks), "down" if down else None, dtype, name=f"down_{i}")(h)
        h = Mid(dtype, name="mid")(h)
        h = nn.swish(GroupNorm(dtype, name="norm_out")(h))
        return _conv(2 * cfg.z_channels, 3, dtype, "conv_out")(h)


class Decoder(nn.Module):
    cfg: Any

    @nn.compact
    def __call__(self, z):
        cfg, dtype = self.cfg, jnp.dtype(self.cfg.dtype)
        h = _conv(cfg.ch * cfg.ch_mult[-1], 3, dtype, "conv_in")(z)
        h = Mid(dtype, name="mid")(h)
        levels = decoder_blocks(cfg)
        for i in reversed(range(len(levels))):
            blocks, up = levels[i]
            h = Level(tuple(co for _, co in blocks), "up" if up else None, dtype, name=f"up_{i}")(h)
        h = nn.swish(GroupNorm(dtype, name="norm_out")(h))
        # A handful of image channels cannot be split over a mesh axis: keep this kernel replicated.
        return _conv(cfg.out_ch, 3, dtype, "conv_out", out_axis=None)(h)


def normalize_mean(mean, cfg):
    """NextStep's encoder_norm: parameter-free LayerNorm of each psz×psz×z patch (the model's image token)."""
    if not cfg.encoder_norm:
        return mean
    b, h, w, _ = mean.shape
    p = cfg.psz
    return unpatchify(normalize_tokens(patchify(mean, p), LATENT_NORM_EPS), h // p, w // p, p)


def sample_posterior(mean, logvar, cfg, *, key=None, eps=None):
    """Diagonal-Gaussian sample ``mean + exp(logvar/2)·eps``; exactly ``mean`` for a deterministic VAE.

    ``eps`` (same shape as ``mean``) is replayed when given, otherwise drawn from ``key``.
    """
    if cfg.deterministic:
        return mean
    if eps is None:
        if key is None:
            raise ValueError("a stochastic VAE posterior needs a PRNG key or an injected eps")
        eps = jax.random.normal(key, mean.shape, mean.dtype)
    return mean + jnp.exp(0.5 * logvar) * eps


def to_model_latents(z, cfg):
    """VAE-space latents -> the model's latent space."""
    return (z - cfg.shift_factor) * cfg.scaling_factor


def from_model_latents(latents, cfg):
    """The model's latent space -> VAE-space latents (decoder input)."""
    return latents / cfg.scaling_factor + cfg.shift_factor


class AutoencoderKL(nn.Module):
    """``init``/``__call__`` reconstruct from the posterior mean; use ``method=`` for the parts."""

    cfg: Any

    def setup(self):
        self.encoder = Encoder(self.cfg)
        self.decoder = Decoder(self.cfg)

    def encode_moments(self, x):
        """Images [B, H, W, C] -> raw encoder moments [B, H/f, W/f, 2·z] in float32."""
        f = downsample_factor(self.cfg) * self.cfg.psz
        if x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"image size {x.shape[1:3]} must be a multiple of {f} (VAE factor × psz)")
        return _constrain(self.encoder(x).astype(jnp.float32))

    def encode(self, x):
        """Images -> (mean after encoder_norm, logvar clamped), both [B, H/f, W/f, z] float32."""
        mean, logvar = jnp.split(self.encode_moments(x), 2, axis=-1)
        return normalize_mean(mean, self.cfg), jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """VAE-space latents [B, h, w, z] -> images [B, h·f, w·f, out_ch] in float32 (not clamped)."""
        return _constrain(self.decoder(z).astype(jnp.float32))

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)
