"""Image generation as one compiled program (the official ``NextStepPipeline.generate_image``).

``Generator.generate`` builds the prompt rows of its captions (``prompts``) and runs, inside a single
``jax.jit``: VAE encoding of edit inputs, the prefill of the rows into a preallocated static KV cache,
optional text decoding (``text_decoding``), then for every image token — condition (``image_out_projector``)
→ flow-matching sampler with guidance and its schedule → optional ``use_norm`` → ``image_in_projector`` →
one decode step — in a ``lax.fori_loop``, and finally unpatchify (explicit grid) and VAE decode. The last
token is not fed back (no wasted decode step) and the LM head never runs on image positions. One
compilation per (rows, prompt length, image size, sampler settings); the guidance scales, seed, text
sampling temperature and top-p and the prompts themselves are runtime values. ``GenerationProgram`` is that
program without params (``python -m nextstep_jax.plan`` lowers it from abstract inputs); ``Generator`` adds the
params and the tokenizer.

Randomness: every sample has a stream ``fold_in(key(seed), sample_id)`` per purpose (flow-matching noise,
VAE posterior of edit inputs, text sampling), so a sample does not depend on the batch it is generated in.
With ``share_noise`` the flow-matching noise of image j is shared by all captions, as the official
``noise_repeat = num_images_per_caption`` tiling does. For parity tests the noises can be injected.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from nextstep_jax.data.images import normalize
from nextstep_jax.generation.prompts import PromptBuilder, PromptError, PromptRows, PromptTokenizer
from nextstep_jax.generation.settings import SamplingSettings
from nextstep_jax.generation.text_decoding import decode_text
from nextstep_jax.latents import normalize_tokens, patchify, unpatchify
from nextstep_jax.models.backbone import init_cache
from nextstep_jax.models.fm_head import head_module
from nextstep_jax.models.fm_sampler import guidance_at, num_noise_draws, sample_head
from nextstep_jax.models.layouts import for_decoding
from nextstep_jax.models.nextstep import NextStep, scatter_image_tokens, token_dim
from nextstep_jax.models.vae import AutoencoderKL, from_model_latents, sample_posterior, to_model_latents

# Independent random streams per sample.
_FM_STREAM, _VAE_STREAM, _TEXT_STREAM = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one call besides array shapes: each combination compiles once."""

    grid: tuple[int, int]
    cfg_mult: int
    prefix: tuple[int, ...]
    open_rows: int
    max_text_tokens: int
    progress: bool
    num_steps: int
    timesteps_shift: float
    last_step_size: float
    time_grid: str
    method: str
    guidance_schedule: str
    use_norm: bool


def uint8_from_pixels(pixels: jax.Array) -> jax.Array:
    return jnp.round(jnp.clip(pixels / 2 + 0.5, 0, 1) * 255).astype(jnp.uint8)


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """Per sample (conditional rows only): ``tokens`` [n, M, 64] float32 (after use_norm), ``latents``
    [n, H/8, W/8, z] (VAE space, NHWC), ``pixels`` [n, H, W, 3] float32 in ~[-1, 1], ``images`` uint8;
    with text decoding, ``text_ids`` [n, text_tokens] and ``text_lengths`` [n]."""

    tokens: np.ndarray
    latents: np.ndarray
    pixels: np.ndarray
    images: np.ndarray
    text_ids: np.ndarray | None = None
    text_lengths: np.ndarray | None = None


class GenerationProgram:
    """The compiled generation function of a model config in the decode layout and a VAE config; it holds
    no params, so ``lower`` also takes abstract ones (``jax.ShapeDtypeStruct``s, e.g. to plan memory).
    ``traces`` counts its compilations."""

    def __init__(self, model_cfg, vae_cfg):
        self.model = NextStep(model_cfg)
        self.vae = AutoencoderKL(vae_cfg)
        self.traces = 0
        self._progress_fn: Callable[[int], None] | None = None
        self._jit = jax.jit(self._generate, static_argnums=0)

    def lower(self, plan: _Plan, variables, vae_variables, batch) -> jax.stages.Lowered:
        """The program for ``inputs``' plan and batch, lowered ahead of time (arrays or abstract)."""
        return self._jit.lower(plan, variables, vae_variables, batch)

    def inputs(self, rows: PromptRows, settings: SamplingSettings, *, images=None, seed: int = 0, sample_ids=None,
               share_noise: bool = False, progress: bool = False, noises=None, vae_eps=None) -> tuple[_Plan, dict]:
        """The program's static plan and batch for prompt rows (arguments as ``Generator.generate``'s;
        ``progress``: whether the program reports each image token)."""
        if not 0 <= seed < 2 ** 32:
            raise PromptError(f"seed must be in [0, 2**32), got {seed}")
        n = rows.num_samples
        sample_ids = np.arange(n) if sample_ids is None else np.asarray(sample_ids)
        if sample_ids.shape != (n,):
            raise PromptError(f"sample_ids must have shape ({n},), got {sample_ids.shape}")
        noise_ids = sample_ids % rows.images_per_caption if share_noise else sample_ids
        batch = dict(input_ids=rows.input_ids, attention_mask=rows.attention_mask,
                     pad_offset=np.int32(rows.pad_offset), seed=np.uint32(seed),
                     sample_ids=sample_ids.astype(np.int32), noise_ids=noise_ids.astype(np.int32),
                     guidance_scale=np.float32(settings.guidance_scale),
                     image_guidance_scale=np.float32(settings.image_guidance_scale), temperature=None, top_p=None,
                     **self._image_inputs(rows, images, sample_ids, vae_eps),
                     noises=self._checked_noises(rows, settings, noises))
        if rows.open_rows:
            batch["temperature"], batch["top_p"] = np.float32(settings.temperature), np.float32(settings.top_p)
        plan = _Plan(grid=rows.grid, cfg_mult=rows.cfg_mult, prefix=rows.prefix, open_rows=rows.open_rows,
                     max_text_tokens=settings.text_tokens if rows.open_rows else 0, progress=progress,
                     num_steps=settings.num_steps, timesteps_shift=settings.timesteps_shift,
                     last_step_size=settings.last_step_size, time_grid=settings.time_grid, method=settings.method,
                     guidance_schedule=settings.guidance_schedule, use_norm=settings.use_norm)
        return plan, batch

    @staticmethod
    def _image_inputs(rows: PromptRows, images, sample_ids, vae_eps) -> dict:
        """Pixels of the input images in feeding order and the (copy, sample id) of each for its eps."""
        if bool(rows.image_rows) != (images is not None):
            raise PromptError("input images must be given exactly when the prompts contain <image>")
        if images is None:
            return dict(pixels=None, image_keys=None, vae_eps=None)
        stacked = np.stack([np.asarray(images[i]) for i in rows.image_rows])
        if stacked.dtype != np.uint8 or stacked.ndim != 4 or stacked.shape[-1] != 3:
            raise PromptError(f"input images must be uint8 [H, W, 3], got {stacked.dtype} {stacked.shape[1:]}")
        fed = np.arange(len(rows.image_rows))
        keys = np.stack([np.asarray(rows.image_copy), sample_ids[fed % rows.num_samples]], 1).astype(np.int32)
        return dict(pixels=normalize(stacked), image_keys=keys,
                    vae_eps=None if vae_eps is None else np.asarray(vae_eps, np.float32))

    def _checked_noises(self, rows: PromptRows, settings: SamplingSettings, noises):
        if noises is None:
            return None
        draws = num_noise_draws(settings.num_steps, settings.time_grid, settings.method)
        expected = (rows.grid[0] * rows.grid[1], draws, rows.num_samples, token_dim(self.model.cfg))
        if noises.shape != expected:
            raise PromptError(f"injected noises must have shape {expected}, got {noises.shape}")
        return np.asarray(noises, np.float32)

    # ------------------------------------------------------------------------------------------ traced
    def _report(self, k):
        if self._progress_fn is not None:
            self._progress_fn(int(k))

    def _generate(self, plan: _Plan, variables, vae_variables, batch):
        self.traces += 1
        model, cfg = self.model, self.model.cfg
        ids, mask = batch["input_ids"], batch["attention_mask"]
        rows, prompt_len = ids.shape
        n = rows // plan.cfg_mult
        num_tokens = plan.grid[0] * plan.grid[1]
        root = jax.random.key(batch["seed"])

        image_tokens = None
        if batch["pixels"] is not None:
            image_tokens = self._encode_images(vae_variables, batch, root, ids)
        embeds = model.apply(variables, ids, image_tokens, method=NextStep.embed)

        text_steps = plan.max_text_tokens + len(plan.prefix) if plan.open_rows else 0
        image_slot = prompt_len + text_steps
        cache = init_cache(cfg, rows, image_slot + num_tokens - 1)
        # Causality is by slot, so slots not yet written may be marked valid from the start; the text phase
        # sets its slots per row.
        kv_valid = jnp.concatenate([mask.astype(bool), jnp.zeros((rows, text_steps), bool),
                                    jnp.ones((rows, num_tokens - 1), bool)], axis=1)
        # Left pads beyond the longest row (length bucket) are not counted in positions: same RoPE positions
        # as the official "longest" padding.
        first_pos = prompt_len - batch["pad_offset"]
        positions = jnp.broadcast_to(jnp.maximum(jnp.arange(prompt_len) - batch["pad_offset"], 0), ids.shape)
        hidden, cache = model.apply(variables, embeds, kv_valid, cache, 0, positions, method=NextStep.step)
        h = hidden[:, -1]
        pos = jnp.full((rows,), first_pos, jnp.int32)

        text_out = {}
        if text_steps:
            stream = jax.random.fold_in(root, _TEXT_STREAM)
            row_samples = batch["sample_ids"][jnp.arange(rows) % n]
            h, cache, kv_valid, pos, text_ids, text_len = decode_text(
                model, variables, h=h, cache=cache, kv_valid=kv_valid, pos=pos, first_slot=prompt_len,
                open_rows=plan.open_rows, max_tokens=plan.max_text_tokens, prefix=plan.prefix,
                keys=jax.vmap(lambda i: jax.random.fold_in(stream, i))(row_samples),
                temperature=batch["temperature"], top_p=batch["top_p"])
            text_out = dict(text_ids=text_ids[:n], text_lengths=text_len[:n])

        tokens = self._decode_image(plan, variables, batch, root, h, cache, kv_valid, pos, image_slot, n)
        gh, gw = plan.grid
        p = cfg.latent_patch_size
        latents = from_model_latents(unpatchify(tokens, gh, gw, p), self.vae.cfg)
        pixels = self.vae.apply(vae_variables, latents.astype(jnp.dtype(self.vae.cfg.dtype)),
                                method=AutoencoderKL.decode)
        return dict(tokens=tokens.astype(jnp.float32), latents=latents.astype(jnp.float32), pixels=pixels,
                    images=uint8_from_pixels(pixels), **text_out)

    def _encode_images(self, vae_variables, batch, root, ids):
        """Input images -> model-space tokens at their placeholder positions [rows, T, 64]."""
        vcfg = self.vae.cfg
        mean, logvar = self.vae.apply(vae_variables, batch["pixels"].astype(jnp.dtype(vcfg.dtype)),
                                      method=AutoencoderKL.encode)
        eps = batch["vae_eps"]
        if eps is None and not vcfg.deterministic:
            stream = jax.random.fold_in(root, _VAE_STREAM)
            eps = jax.vmap(lambda k: jax.random.normal(
                jax.random.fold_in(jax.random.fold_in(stream, k[0]), k[1]), mean.shape[1:]))(batch["image_keys"])
        z = sample_posterior(mean, logvar, vcfg, eps=eps)
        tokens = patchify(to_model_latents(z, vcfg), self.model.cfg.latent_patch_size)
        return scatter_image_tokens(ids, tokens.reshape(-1, tokens.shape[-1]), self.model.cfg.image_placeholder_id)

    def _decode_image(self, plan, variables, batch, root, h, cache, kv_valid, pos, first_slot, n):
        model, cfg = self.model, self.model.cfg
        dtype = jnp.dtype(cfg.dtype)
        rows = h.shape[0]
        num_tokens = plan.grid[0] * plan.grid[1]
        dim = token_dim(cfg)
        draws = num_noise_draws(plan.num_steps, plan.time_grid, plan.method)
        fm_stream = jax.random.fold_in(root, _FM_STREAM)
        sample_keys = jax.vmap(lambda i: jax.random.fold_in(fm_stream, i))(batch["noise_ids"])
        placeholder = jnp.full((rows, 1), cfg.image_placeholder_id, jnp.int32)
        head = variables["params"]["image_head"]
        head_net = head_module(head, dtype)

        def sample_token(k, h):
            c = model.apply(variables, h, method=NextStep.condition)
            if batch["noises"] is not None:
                noise = batch["noises"][k]
            else:
                noise = jax.vmap(lambda key: jax.random.normal(jax.random.fold_in(key, k), (draws, dim)))(
                    sample_keys).transpose(1, 0, 2)
            x = sample_head(head_net, {"params": head}, c, cfg_mult=plan.cfg_mult, num_steps=plan.num_steps,
                            timesteps_shift=plan.timesteps_shift, last_step_size=plan.last_step_size,
                            grid=plan.time_grid, method=plan.method, noises=noise,
                            guidance_scale=guidance_at(plan.guidance_schedule, batch["guidance_scale"], k,
                                                       num_tokens),
                            image_guidance_scale=guidance_at(plan.guidance_schedule, batch["image_guidance_scale"],
                                                             k, num_tokens))
            # The released sampler returns the token in the model dtype; use_norm is applied to that.
            x = x.astype(dtype)
            if plan.use_norm:
                x = normalize_tokens(x)
            if plan.progress:
                jax.debug.callback(self._report, k)
            return x

        def body(k, carry):
            h, cache, tokens = carry
            x = sample_token(k, h)
            tokens = jax.lax.dynamic_update_index_in_dim(tokens, x, k, 0)
            e = model.apply(variables, placeholder, jnp.tile(x, (plan.cfg_mult, 1))[:, None], method=NextStep.embed)
            hidden, cache = model.apply(variables, e, kv_valid, cache, first_slot + k, (pos + k)[:, None],
                                        method=NextStep.step)
            return hidden[:, 0], cache, tokens

        tokens = jnp.zeros((num_tokens, n, dim), dtype)
        h, cache, tokens = jax.lax.fori_loop(0, num_tokens - 1, body, (h, cache, tokens))
        tokens = jax.lax.dynamic_update_index_in_dim(tokens, sample_token(num_tokens - 1, h), num_tokens - 1, 0)
        return tokens.transpose(1, 0, 2)


class Generator(GenerationProgram):
    """A NextStep model + VAE with their params and tokenizer, and the compiled generation function.

    The params may come in any layout (``checkpoint.load_model`` gives scanned layers by default): the
    Generator keeps them in the decode layout (``models.layouts.for_decoding``: layers unrolled, q/k/v and
    gate/up fused; ``python -m nextstep_jax.bench --only backbone`` measures each layout). With ``donate``
    the given params are consumed by that conversion, so the model is not held twice. ``prompts`` builds
    the prompt rows; ``traces`` counts compilations of the generation program.
    """

    def __init__(self, model_cfg, params, vae_cfg, vae_params, tokenizer: PromptTokenizer, *,
                 donate: bool = False):
        if vae_cfg.z_channels != model_cfg.latent_channels:
            raise PromptError(f"VAE has {vae_cfg.z_channels} latent channels, the model expects "
                              f"{model_cfg.latent_channels}")
        self.prompts = PromptBuilder(tokenizer, model_cfg, vae_cfg)
        model_cfg, params = for_decoding(model_cfg, params, donate=donate)
        super().__init__(model_cfg, vae_cfg)
        self.variables = {"params": params}
        self.vae_variables = {"params": vae_params}

    # ------------------------------------------------------------------------------------------ public
    def generate(self, captions: list[str], settings: SamplingSettings, *, images: list[np.ndarray] | None = None,
                 num_images_per_caption: int = 1, seed: int = 0, sample_ids: np.ndarray | None = None,
                 share_noise: bool = False, progress: Callable[[int], None] | None = None,
                 noises: np.ndarray | None = None, vae_eps: np.ndarray | None = None) -> GenerationResult:
        """``num_images_per_caption`` images of each caption (caption-major).

        ``images``: one uint8 [H, W, 3] per caption for editing (its caption holds ``<image>``).
        ``sample_ids`` [n]: global index of each sample (default 0..n-1) — the random streams depend on it,
        never on the batch. ``share_noise``: FM noise by image index within the caption (official tiling).
        ``progress(k)`` is called after image token k. Injected randomness (parity): ``noises`` [M, draws, n,
        64], ``vae_eps`` [images fed, H/8, W/8, z] in feeding order.
        """
        settings = settings.for_model(self.model.cfg)
        rows = self.prompts.rows(captions, settings, num_images_per_caption=num_images_per_caption,
                                 image_sizes=None if images is None else [np.shape(im)[:2] for im in images])
        return self._run(rows, settings, images=images, seed=seed, sample_ids=sample_ids, share_noise=share_noise,
                         progress=progress, noises=noises, vae_eps=vae_eps)

    def generate_rows(self, rows: PromptRows, settings: SamplingSettings, **kwargs) -> GenerationResult:
        """``generate`` for prompt rows built elsewhere (e.g. written by hand); ``kwargs`` as ``generate``'s.
        The rows must have the guidance layout and text rows of ``settings``."""
        if rows.cfg_mult != settings.cfg_mult:
            raise PromptError(f"rows have cfg_mult={rows.cfg_mult} but the settings' guidance needs "
                              f"{settings.cfg_mult}")
        if bool(rows.open_rows) != (settings.text_tokens > 0):
            raise PromptError("rows are left open for text decoding exactly when settings.text_tokens > 0")
        return self._run(rows, settings.for_model(self.model.cfg), **kwargs)

    def _run(self, rows: PromptRows, settings: SamplingSettings, *, progress=None, **kwargs) -> GenerationResult:
        plan, batch = self.inputs(rows, settings, progress=progress is not None, **kwargs)
        self._progress_fn = progress
        try:
            out = jax.device_get(self._jit(plan, self.variables, self.vae_variables, batch))
        finally:
            self._progress_fn = None
        return GenerationResult(**out)
