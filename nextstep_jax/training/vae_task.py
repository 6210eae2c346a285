"""Image-tokenizer (VAE) training: ``config.task = "vae"`` of ``python -m nextstep_jax.train``.

    python -m nextstep_jax.train --config=configs/tokenizer_shapes.py --workdir runs/vae --export runs/vae/release
    python -m nextstep_jax.train --config=configs/tokenizer_finetune.py --workdir /runs/vae \\
        --config.init.vae=NextStep-1-f8ch16-Tokenizer --export /runs/vae/release

The same loop as NextStep training (``training/loop.py``): mesh, Orbax checkpoints with the data iterator
(exact resume), metrics.jsonl + TensorBoard, SIGTERM handling, export. What differs is the model (the ``vae`` section's
AutoencoderKL), the data (``data/image_pipeline.py``: image batches, ``data.batch_size`` images per step) and
the step. Sections read (defaults in ``vae_task_config()``): ``vae``, ``vae_train`` (losses, noise, critic,
scratch init), ``data``, ``optim``/``schedule`` (the VAE's AdamW), ``eval`` (held-out set), ``init.vae``
(the tokenizer to start from: a release folder or a converted checkpoint; "" = from scratch), ``mesh``,
``checkpoint``, ``seed``, ``total_steps``.

One step, per image x (its own key, so results do not depend on the device split):
  moments = encoder(x); mean, logvar = split(moments), logvar clamped as the released posterior does
  z = LN(mean) (``encoder_norm``, per psz x psz token) ; z += exp(logvar/2)·eps unless ``vae.deterministic``
  z += alpha·eps', alpha ~ U(0, vae_train.noise_gamma) per image (NextStep's noise regularisation)
  x̂ = decoder(z)
  (``vae_train.freeze_encoder``: the encoder's output is a constant and its parameters get no update, so the
  latent space, and any latents cached from it, stay as they are while the decoder learns)
  loss = l1·|x̂ - x| + l2·(x̂ - x)² + kl·KL(mean, logvar) + perceptual·LPIPS(x̂, x) + gan·(-D(x̂))
The KL is taken on the raw posterior, before the normalisation. The critic D (``training/patch_gan.py``) and
its hinge loss switch on at ``vae_train.gan_start_step``; it has its own Adam.

Evaluation every ``eval.every_steps`` steps and at the end, on ``eval.num_images`` held-out images (the posterior
mean, no noise): PSNR and SSIM on uint8 (``training/image_metrics.py``), the mini GenEval of the
reconstructions for the shapes data, the per-channel mean/std of the latent the decoder consumes, and a PNG
grid of originals beside reconstructions: ``eval/step_<step>.png`` and ``.json`` in the workdir, the scalars in
metrics.jsonl. ``--export DIR`` writes the release layout (``config.json`` + ``checkpoint.safetensors``, the
key names of the released tokenizer) that ``checkpoint.load_vae`` and the official code read. A VAE with
``encoder_norm`` keeps scale 1 / shift 0 (its latent is normalised per token already, NextStep's
convention); one without it gets the measured ``shift_factor`` = mean and ``scaling_factor`` = 1/std of its
held-out latents, so the model space has zero mean and unit variance.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nextstep_jax.checkpoint import load_vae
from nextstep_jax.configs import ConfigError
from nextstep_jax.data.image_pipeline import ImageDataConfig, make_image_iterator
from nextstep_jax.data.pipeline import dataset_specs
from nextstep_jax.models.vae import LOGVAR_RANGE, AutoencoderKL, normalize_mean, sample_posterior
from nextstep_jax.sharding import LOGICAL_AXIS_RULES, batch_sharding, batch_shards, make_mesh, shardings_of, use_mesh
from nextstep_jax.training import vae_losses
from nextstep_jax.training.distributed import say
from nextstep_jax.training.optimizer import make_optimizer
from nextstep_jax.training.patch_gan import PatchDiscriminator
from nextstep_jax.training.perceptual import load_perceptual_weights
from nextstep_jax.training.run_config import check_run_fields
from nextstep_jax.training.workdir import has_checkpoints

INIT_SCHEMES = ("official", "residual_zero")
EVAL_DIR = "eval"
ENCODER_PARAMS = "encoder/.*"  # the optim.freeze pattern of vae_train.freeze_encoder
_POSTERIOR, _NOISE = 0, 1
# The ResnetBlock / attention convs whose output is added to the residual stream.
_RESIDUAL_OUTPUTS = ("conv2", "proj_out")


def vae_train_config(**overrides) -> ml_collections.ConfigDict:
    """Defaults of ``config.vae_train``."""
    cfg = ml_collections.ConfigDict(dict(
        l1=1.0,  # weight of mean |x̂ - x| (pixels in [-1, 1])
        l2=0.0,  # weight of mean (x̂ - x)²
        kl=0.0,  # weight of the posterior's KL per latent element (a stochastic VAE, vae.deterministic=False)
        noise_gamma=0.0,  # NextStep's noise regularisation: strength ~ U(0, gamma) per image; 0 = off
        perceptual=0.0,  # weight of LPIPS(x̂, x); needs perceptual_weights
        perceptual_weights="",  # VGG16 (+ LPIPS heads) file, see training/perceptual.py for the format
        gan=0.0,  # weight of the adversarial term; 0 = no critic
        gan_start_step=0,  # the critic and its term act from this many applied updates on
        disc_channels=64,  # PatchGAN width (a multiple of 16) and depth
        disc_layers=3,
        disc_lr=1e-4,  # the critic's Adam (b1 0.5, b2 0.9, as GAN practice; eps is optim.eps)
        # Scratch init: "official" = the released code's N(0, 0.02) for every conv; "residual_zero" = LeCun
        # normal convs with the last conv of every residual branch zero, so each block starts as the identity.
        init="official",
        # Train the decoder alone (the encoder's parameters frozen, no gradient through it): fine-tuning a trained
        # tokenizer's decoder, e.g. with more noise_gamma, keeps its latent space and every latent cached from it.
        freeze_encoder=False,
    ))
    cfg.update(overrides)
    return cfg


def vae_eval_config(**overrides) -> ml_collections.ConfigDict:
    """The VAE task's fields of ``config.eval``."""
    cfg = ml_collections.ConfigDict(dict(
        every_steps=0,  # evaluate every this many steps and at the end; 0 = only at the end
        dataset={"source": "shapes", "split": "eval"},  # a data.datasets entry: where held-out images come from
        num_images=64,
        batch_size=16,  # images per evaluation call (a multiple of the mesh's batch shards)
        grid_images=16,  # originals and reconstructions in the PNG grid
    ))
    cfg.update(overrides)
    return cfg


def with_vae_defaults(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """``config`` with every VAE-task field it leaves out at its default."""
    from nextstep_jax.configs import merge

    defaults = ml_collections.ConfigDict(dict(vae_train=vae_train_config(), eval=vae_eval_config()))
    return merge(defaults, config)


def check_vae_config(config: ml_collections.ConfigDict) -> None:
    """Every VAE-task field that can be checked before anything is built; one error naming the field."""
    t, e = config.vae_train, config.eval

    def need(ok: bool, field: str, value, what: str) -> None:
        if not ok:
            raise ConfigError(f"{field}={value!r}: {what}")

    for name in ("l1", "l2", "kl", "noise_gamma", "perceptual", "gan", "disc_lr"):
        need(isinstance(t[name], (int, float)) and t[name] >= 0, f"vae_train.{name}", t[name], "must be >= 0")
    need(t.l1 + t.l2 + t.perceptual > 0, "vae_train.l1+l2+perceptual", t.l1 + t.l2 + t.perceptual,
         "some reconstruction term must have a positive weight")
    need(t.init in INIT_SCHEMES, "vae_train.init", t.init, f"expected one of {INIT_SCHEMES}")
    need(not t.freeze_encoder or bool(config.init.vae), "vae_train.freeze_encoder", t.freeze_encoder,
         "needs init.vae, the trained tokenizer whose encoder it keeps")
    need(t.perceptual == 0 or bool(t.perceptual_weights), "vae_train.perceptual_weights", t.perceptual_weights,
         "vae_train.perceptual > 0 needs a weight file (never downloaded)")
    need(isinstance(t.gan_start_step, int) and t.gan_start_step >= 0, "vae_train.gan_start_step",
         t.gan_start_step, "must be an integer >= 0")
    need(t.disc_channels > 0 and t.disc_channels % 16 == 0, "vae_train.disc_channels", t.disc_channels,
         "must be a positive multiple of 16 (GroupNorm of 32 groups on 2x its width)")
    need(t.disc_layers >= 1, "vae_train.disc_layers", t.disc_layers, "must be >= 1")
    need(config.init.source == "scratch", "init.source", config.init.source,
         "task='vae' starts from init.vae (a tokenizer folder) or from scratch; init.source/init.path name a "
         "NextStep model")
    for name in ("num_images", "batch_size", "grid_images"):
        need(isinstance(e[name], int) and e[name] >= 1, f"eval.{name}", e[name], "must be an integer >= 1")
    need(e.grid_images <= e.num_images, "eval.grid_images", e.grid_images, "must be <= eval.num_images")
    f = 2 ** (len(config.vae.ch_mult) - 1) * config.vae.psz
    need(config.data.image_size % f == 0, "data.image_size", config.data.image_size,
         f"must be a multiple of {f} (the VAE's down factor x vae.psz)")
    need(config.vae.ch % 32 == 0, "vae.ch", config.vae.ch, "must be a multiple of 32 (GroupNorm of 32 groups)")
    microbatches = (config.get("train_step") or {}).get("microbatches", 1)
    need(microbatches == 1, "train_step.microbatches", microbatches, "task='vae' takes whole batches")


# ------------------------------------------------------------------------------------------------ the state


@flax.struct.dataclass
class VaeTrainState:
    step: jax.Array  # int32: updates applied (skipped non-finite steps included)
    params: Any  # the VAE's
    opt_state: Any
    rng: jax.Array  # uint32 [2]; the key of a step is fold_in(rng, step)
    skipped: jax.Array  # int32: steps left out for a non-finite loss or gradient
    disc_params: Any = None  # the critic's (vae_train.gan > 0)
    disc_opt_state: Any = None


def abstract_vae_variables(vae_cfg, image_size: int):
    model = AutoencoderKL(vae_cfg)
    return jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, image_size, image_size, 3), jnp.float32)),
                          jax.random.PRNGKey(0))


def critic(train_cfg) -> PatchDiscriminator | None:
    return PatchDiscriminator(train_cfg.disc_channels, train_cfg.disc_layers) if train_cfg.gan > 0 else None


def critic_optimizer(config) -> optax.GradientTransformation:
    return optax.adam(config.vae_train.disc_lr, b1=0.5, b2=0.9, eps=config.optim.eps)


class VaeStateLayout:
    """Shapes and shardings of the VAE train state on ``mesh``: VAE params by their logical axis names, the
    optimizer moments like their params (``training.state.follow_params``), the critic replicated (small)."""

    def __init__(self, config, optimizer: optax.GradientTransformation, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
        from nextstep_jax.training.state import follow_params

        self.config, self.optimizer, self.mesh = config, optimizer, mesh
        size = config.data.image_size
        boxed = abstract_vae_variables(config.vae, size)
        self.param_shardings = shardings_of(boxed, mesh, rules)["params"]
        params = nn.unbox(boxed)["params"]
        self.disc = critic(config.vae_train)
        self.disc_optimizer = critic_optimizer(config)
        disc = None
        if self.disc is not None:
            disc = jax.eval_shape(lambda k: self.disc.init(k, jnp.zeros((1, size, size, 3)))["params"],
                                  jax.random.PRNGKey(0))
        shapes = jax.eval_shape(lambda p, d: self._new(p, d, 0), params, disc)
        replicated = NamedSharding(mesh, PartitionSpec())
        self.shardings = VaeTrainState(
            step=replicated, params=self.param_shardings,
            opt_state=follow_params(shapes.opt_state, params, self.param_shardings, mesh),
            rng=replicated, skipped=replicated,
            disc_params=jax.tree.map(lambda _: replicated, shapes.disc_params),
            disc_opt_state=jax.tree.map(lambda _: replicated, shapes.disc_opt_state))
        self.abstract = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes,
                                     self.shardings)

    def _new(self, params, disc_params, seed) -> VaeTrainState:
        disc_opt = None if disc_params is None else self.disc_optimizer.init(disc_params)
        return VaeTrainState(step=jnp.int32(0), params=params, opt_state=self.optimizer.init(params),
                             rng=jax.random.PRNGKey(seed), skipped=jnp.int32(0), disc_params=disc_params,
                             disc_opt_state=disc_opt)

    def scratch_params(self, key: jax.Array):
        """VAE params of ``vae_train.init`` drawn directly sharded."""
        size, scheme = self.config.data.image_size, self.config.vae_train.init
        model = AutoencoderKL(self.config.vae)

        def init(k):
            params = nn.unbox(model.init(k, jnp.zeros((1, size, size, 3), jnp.float32)))["params"]
            return params if scheme == "official" else residual_zero(params, jax.random.fold_in(k, 1))

        return jax.jit(init, out_shardings=self.param_shardings)(key)

    def new_state(self, params, seed: int) -> VaeTrainState:
        """Step 0 from ``params`` (resharded if needed); a fresh critic from ``seed``."""
        params = jax.device_put(params, self.param_shardings)
        size = self.config.data.image_size

        def make(p):
            disc = None
            if self.disc is not None:
                disc = self.disc.init(jax.random.fold_in(jax.random.PRNGKey(seed), 2),
                                      jnp.zeros((1, size, size, 3)))["params"]
            return self._new(p, disc, seed)

        return jax.jit(make, out_shardings=self.shardings)(params)


def residual_zero(params, key: jax.Array):
    """LeCun-normal conv kernels (variance 1/fan_in), zero kernels at the end of every residual branch."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, leaf) in enumerate(leaves):
        names = [str(getattr(k, "key", k)) for k in path]
        if names[-1] != "kernel":
            out.append(leaf)
        elif names[-2] in _RESIDUAL_OUTPUTS:
            out.append(jnp.zeros_like(leaf))
        else:
            fan_in = math.prod(leaf.shape[:-1])
            out.append(jax.random.normal(jax.random.fold_in(key, i), leaf.shape, leaf.dtype) / math.sqrt(fan_in))
    return jax.tree_util.tree_unflatten(treedef, out)


# ------------------------------------------------------------------------------------------------- the step


def training_reconstruction(vae: AutoencoderKL, params, images, keys, noise_gamma: float,
                            freeze_encoder: bool = False):
    """(x̂, raw posterior mean, clamped logvar) with the posterior sampled (unless deterministic) and the
    noise regularisation applied, each image drawing from its own key (``keys`` [B])."""
    cfg = vae.cfg
    moments = vae.apply({"params": params}, images.astype(cfg.dtype), method=AutoencoderKL.encode_moments)
    if freeze_encoder:
        moments = jax.lax.stop_gradient(moments)  # no backward pass through the encoder at all
    mean, logvar = jnp.split(moments, 2, axis=-1)
    logvar = jnp.clip(logvar, *LOGVAR_RANGE)
    z = normalize_mean(mean, cfg)
    if not cfg.deterministic:
        eps = jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, _POSTERIOR), z.shape[1:]))(keys)
        z = sample_posterior(z, logvar, cfg, eps=eps)
    if noise_gamma > 0:
        noise_keys = jax.vmap(lambda k: jax.random.fold_in(k, _NOISE))(keys)
        z = vae_losses.add_latent_noise(z, *vae_losses.draw_latent_noise(noise_keys, z.shape[1:], noise_gamma))
    return vae.apply({"params": params}, z.astype(cfg.dtype), method=AutoencoderKL.decode), mean, logvar


STEP_METRICS = ("loss", "l1", "l2", "kl", "grad_norm", "nonfinite", "skipped")


def make_vae_train_step(config, layout: VaeStateLayout, *, rules=LOGICAL_AXIS_RULES, donate: bool = True):
    """The jitted ``step(state, batch, perceptual_net=None) -> (state, metrics)`` on the layout's mesh.

    ``batch["images"]`` [B, H, W, 3] in [-1, 1] is split along B over the mesh's batch axes. Metrics: the
    weighted total ``loss`` and every term (``perceptual``, ``gan_g`` and ``gan_d`` when enabled), the
    global gradient norm, ``nonfinite`` and the count of ``skipped`` steps (a non-finite step changes nothing).
    """
    t = config.vae_train
    vae, optimizer, disc, disc_tx = AutoencoderKL(config.vae), layout.optimizer, layout.disc, layout.disc_optimizer
    gamma, start = float(t.noise_gamma), int(t.gan_start_step)
    use_perceptual = t.perceptual > 0

    def step(state: VaeTrainState, batch, perceptual_net=None):
        images = batch["images"]
        step_key = jax.random.fold_in(state.rng, state.step)
        keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(images.shape[0]))
        gan_on = (state.step >= start).astype(jnp.float32)

        def loss_fn(params):
            rec, mean, logvar = training_reconstruction(vae, params, images, keys, gamma, t.freeze_encoder)
            terms = vae_losses.reconstruction_terms(rec, images)
            terms["kl"] = vae_losses.kl_divergence(mean, logvar)
            total = t.l1 * terms["l1"] + t.l2 * terms["l2"] + t.kl * terms["kl"]
            if use_perceptual:
                from nextstep_jax.training.perceptual import perceptual_loss

                terms["perceptual"] = perceptual_loss(perceptual_net, rec, images)
                total = total + t.perceptual * terms["perceptual"]
            if disc is not None:
                terms["gan_g"] = vae_losses.generator_adversarial_loss(
                    disc.apply({"params": state.disc_params}, rec))
                total = total + gan_on * t.gan * terms["gan_g"]
            return total, (terms, rec)

        (loss, (terms, rec)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        new = dict(params=optax.apply_updates(state.params, updates), opt_state=opt_state)
        old = dict(params=state.params, opt_state=state.opt_state)
        if disc is not None:
            fake = jax.lax.stop_gradient(rec)

            def critic_loss(dp):
                logits = lambda x: disc.apply({"params": dp}, x)
                return gan_on * vae_losses.hinge_discriminator_loss(logits(images), logits(fake))

            terms["gan_d"], d_grads = jax.value_and_grad(critic_loss)(state.disc_params)
            finite = finite & jnp.isfinite(terms["gan_d"])
            d_updates, d_opt = disc_tx.update(d_grads, state.disc_opt_state, state.disc_params)
            new.update(disc_params=optax.apply_updates(state.disc_params, d_updates), disc_opt_state=d_opt)
            old.update(disc_params=state.disc_params, disc_opt_state=state.disc_opt_state)
        new = jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        metrics = {"loss": loss, **terms, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.float32),
                   "skipped": skipped.astype(jnp.float32)}
        return state.replace(step=state.step + 1, skipped=skipped, **new), metrics

    replicated = NamedSharding(layout.mesh, PartitionSpec())
    jitted = jax.jit(step, in_shardings=(layout.shardings, batch_sharding(layout.mesh, rules), replicated),
                     out_shardings=(layout.shardings, replicated), donate_argnums=(0,) if donate else ())

    def run(state, batch, perceptual_net=None):
        with use_mesh(layout.mesh, rules):
            return jitted(state, batch, perceptual_net)

    def lower(state, batch, perceptual_net=None):
        with use_mesh(layout.mesh, rules):
            return jitted.lower(state, batch, perceptual_net)

    run.lower = lower
    return run


# ------------------------------------------------------------------------------------------------ evaluation


def latent_statistics(z: np.ndarray) -> dict[str, Any]:
    """Per-channel and pooled mean/std (float64) of latents [N, h, w, c]."""
    z = np.asarray(z, np.float64)
    return {"channel_mean": z.mean(axis=(0, 1, 2)).tolist(), "channel_std": z.std(axis=(0, 1, 2)).tolist(),
            "mean": float(z.mean()), "std": float(z.std())}


class VaeEvaluator:
    """The held-out images, the compiled reconstruction, and the report of one evaluation."""

    def __init__(self, config, mesh: Mesh, workdir: Path, rules=LOGICAL_AXIS_RULES):
        from nextstep_jax.data.image_pipeline import held_out_images
        from nextstep_jax.data.pipeline import SHAPES, DatasetSpec

        e = config.eval
        spec = DatasetSpec(**dict(e.dataset))
        self.images, self.captions = held_out_images(spec, e.num_images, config.data.image_size)
        self.score_captions = spec.source == SHAPES
        self.every, self.total = e.every_steps, config.total_steps
        self.batch, self.grid_images = e.batch_size, e.grid_images
        self.folder = workdir / EVAL_DIR
        self.mesh, self.rules = mesh, rules
        shards = batch_shards(mesh, rules)
        if self.batch % shards:
            raise ValueError(f"eval.batch_size={self.batch} is not divisible by the mesh's {shards} batch shards")
        vae = AutoencoderKL(config.vae)

        def reconstruct(params, x):
            mean, _ = vae.apply({"params": params}, x.astype(config.vae.dtype), method=AutoencoderKL.encode)
            return vae.apply({"params": params}, mean.astype(config.vae.dtype), method=AutoencoderKL.decode), mean

        self._split = batch_sharding(mesh, rules)
        self._jit = jax.jit(reconstruct, out_shardings=NamedSharding(mesh, PartitionSpec()))

    def due(self, step: int) -> bool:
        return step == self.total or bool(self.every and step % self.every == 0)

    def reconstruct(self, params) -> tuple[np.ndarray, np.ndarray]:
        """(uint8 reconstructions, latents the decoder consumed) of the held-out images."""
        from nextstep_jax.data.images import normalize
        from nextstep_jax.generation.generator import uint8_from_pixels

        n = len(self.images)
        padded = -(-n // self.batch) * self.batch
        x = normalize(np.concatenate([self.images, self.images[: padded - n]]))
        outs, latents = [], []
        with use_mesh(self.mesh, self.rules):
            for i in range(0, padded, self.batch):
                chunk = x[i: i + self.batch]
                array = jax.make_array_from_callback(chunk.shape, self._split, lambda idx, c=chunk: c[idx])
                pixels, z = self._jit(params, array)
                outs.append(np.asarray(uint8_from_pixels(pixels)))
                latents.append(np.asarray(z))
        return np.concatenate(outs)[:n], np.concatenate(latents)[:n]

    def evaluate(self, step: int, params) -> dict[str, float]:
        """Writes eval/step_<step>.png and .json (process 0); returns the scalars for metrics.jsonl."""
        from nextstep_jax.training.image_metrics import psnr, ssim

        started = time.perf_counter()
        recon, z = self.reconstruct(params)
        report = {"step": step, "images": len(recon), "psnr_db": float(np.mean(psnr(self.images, recon))),
                  "ssim": float(np.mean(ssim(self.images, recon))), "latent": latent_statistics(z)}
        if self.score_captions:
            from nextstep_jax.data.scorer import evaluate as geneval

            report["geneval"] = geneval(list(recon), self.captions)
            report["geneval_originals"] = geneval(list(self.images), self.captions)["overall"]
        if jax.process_index() == 0:
            self._write(step, recon, report)
        scalars = {"eval/psnr_db": report["psnr_db"], "eval/ssim": report["ssim"],
                   "eval/latent_mean": report["latent"]["mean"], "eval/latent_std": report["latent"]["std"],
                   "eval/seconds": time.perf_counter() - started}
        if self.score_captions:
            scalars["eval/geneval"] = report["geneval"]["overall"]
        return scalars

    def _write(self, step: int, recon: np.ndarray, report: dict) -> None:
        from nextstep_jax.generation.image_files import grid, write_json, write_png

        k = self.grid_images
        pairs = [np.concatenate([a, b], axis=1) for a, b in zip(self.images[:k], recon[:k])]
        stem = self.folder / f"step_{step:07d}"
        write_png(stem.with_suffix(".png"), grid(pairs, columns=max(1, round(math.sqrt(k / 2)))),
                  {"step": str(step), "layout": "each pair: held-out image | reconstruction"})
        write_json(stem.with_suffix(".json"), report)


# ---------------------------------------------------------------------------------------------------- export


def exported_vae_config(vae_cfg: ml_collections.ConfigDict, latent_stats: dict | None = None
                        ) -> ml_collections.ConfigDict:
    """The VAE config an export writes: without ``encoder_norm`` and with measured latent statistics, the
    measured latent scaling (zero mean, unit variance in the model space); otherwise ``vae_cfg`` as it is."""
    from nextstep_jax.configs import replace

    if vae_cfg.encoder_norm or latent_stats is None:
        return vae_cfg
    return replace(vae_cfg, shift_factor=latent_stats["mean"], scaling_factor=1.0 / latent_stats["std"])


def export_vae(vae_cfg, params, dest: str | Path, latent_stats: dict | None = None) -> Path:
    """``dest`` in the release layout (config.json + checkpoint.safetensors under the released key names)."""
    from nextstep_jax.training.export import write_vae_release

    return write_vae_release(dest, exported_vae_config(vae_cfg, latent_stats), params)


# ------------------------------------------------------------------------------------------------ the task


@dataclasses.dataclass
class VaeTask:
    """What the shared loop (``training/loop.py``) asks of VAE training."""

    config: ml_collections.ConfigDict
    workdir: Path
    export_to: Path | None
    progress: bool
    layout: VaeStateLayout
    schedule: Any
    data: Any
    evaluator: VaeEvaluator
    perceptual_net: Any
    initial_params: Any  # None when the workdir holds checkpoints to resume from
    step_name: str = "VAE train step"

    def abstract_state(self):
        return self.layout.abstract

    def initial_state(self):
        params, self.initial_params = self.initial_params, None  # the state holds them from here on
        if params is None:  # the workdir held only checkpoints that were never completed
            params = _initial_params(self.config, self.layout)
        return self.layout.new_state(params, self.config.seed)

    def train_step(self):
        return make_vae_train_step(self.config, self.layout)

    def step_extra(self):
        return self.perceptual_net

    def global_batch(self, local: dict) -> dict:
        return {"images": jax.make_array_from_process_local_data(self._batch_sharding, local["images"])}

    @functools.cached_property
    def _batch_sharding(self):
        return batch_sharding(self.layout.mesh)

    def measure(self, local: dict, seconds: float) -> dict:
        return {"step_time": seconds, "images_per_s": self.config.data.batch_size / seconds, **self.data.metrics()}

    def evaluation_due(self, step: int) -> bool:
        return self.evaluator.due(step)

    def evaluate(self, step: int, params) -> dict:
        return self.evaluator.evaluate(step, params)

    def export(self, params) -> None:
        stats = None if self.config.vae.encoder_norm else latent_statistics(self.evaluator.reconstruct(params)[1])
        export_vae(self.config.vae, params, self.export_to, stats)
        say(f"exported the tokenizer to {self.export_to}")


def prepare(config: ml_collections.ConfigDict, args) -> VaeTask:
    """Validate everything and build what can be built without writing or compiling."""
    config = with_vae_defaults(config)
    check_vae_config(config)
    check_run_fields(config, args)
    mesh = make_mesh(dict(config.mesh))
    shards = batch_shards(mesh)
    if config.data.batch_size % shards:
        raise ConfigError(f"data.batch_size={config.data.batch_size} is not divisible by the mesh's {shards} batch "
                          "shards (mesh axes data x fsdp)")
    perceptual_net = None
    if config.vae_train.perceptual > 0:
        perceptual_net = jax.device_put(load_perceptual_weights(config.vae_train.perceptual_weights),
                                        NamedSharding(mesh, PartitionSpec()))
    data = make_image_iterator(ImageDataConfig.from_config(config), dataset_specs(config))
    params = nn.unbox(abstract_vae_variables(config.vae, config.data.image_size))["params"]
    optim = config.optim
    if config.vae_train.freeze_encoder:
        optim = ml_collections.ConfigDict(dict(optim))
        optim.freeze = (*optim.freeze, ENCODER_PARAMS)
    optimizer, schedule = make_optimizer(optim, config.schedule, params, total_steps=config.total_steps)
    layout = VaeStateLayout(config, optimizer, mesh)
    evaluator = VaeEvaluator(config, mesh, args.workdir)
    initial = None if has_checkpoints(args.workdir) else _initial_params(config, layout)
    return VaeTask(config=config, workdir=args.workdir, export_to=args.export, progress=not args.no_progress,
                   layout=layout, schedule=schedule, data=data, evaluator=evaluator, perceptual_net=perceptual_net,
                   initial_params=initial)


def _initial_params(config, layout: VaeStateLayout):
    if config.init.vae:
        _, params = load_vae(config.init.vae, dtype=np.float32, mesh=layout.mesh)
        return params
    return layout.scratch_params(jax.random.fold_in(jax.random.PRNGKey(config.seed), 0))
