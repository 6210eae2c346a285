"""The sharded train step: loss, gradients (accumulated over microbatches), non-finite guard, optax update.

    step = make_train_step(config, model, optimizer, mesh)           # jitted, donates the state
    state, metrics = step(state, batch)                              # cached latents: batch["image_tokens"]
    state, metrics = step(state, batch, vae_params)                  # pixels: the frozen VAE encodes inside

``batch`` is a packed batch of the data pipeline (``data/packing.py``): input_ids, labels, segment_ids,
positions, image_loss_mask and either image_tokens [B, T, D] or images [B, K, H, W, 3] + image_slots [B, T];
B is the GLOBAL batch (``config.data.batch_size``), split over the mesh's batch axes.

Microbatches (``config.train_step.microbatches``) take every m-th row, so each one stays spread over all
devices, and each microbatch loss is normalised by the counts of the whole batch: the accumulated loss and
gradients equal those of the whole batch in one go, and every row draws its FM noise from its own key.

A step whose loss or gradient norm is not finite leaves params and optimizer state unchanged, counts itself in
``state.skipped`` and reports ``nonfinite`` = 1; ``config.train_step.nonfinite`` tells the trainer whether
to go on ("skip") or stop ("stop").
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from nextstep_jax.latents import patchify
from nextstep_jax.models.nextstep import NextStep, loss_counts
from nextstep_jax.models.vae import AutoencoderKL, downsample_factor, sample_posterior, to_model_latents
from nextstep_jax.sharding import LOGICAL_AXIS_RULES, batch_sharding, use_mesh, validate_mesh
from nextstep_jax.training.distributed import say
from nextstep_jax.training.state import TrainState, abstract_train_state

NONFINITE_MODES = ("skip", "stop")
METRICS = ("loss", "lm_loss", "im_loss", "lm_tokens", "image_tokens", "lm_gathered", "grad_norm", "nonfinite",
           "skipped")
_FM_STREAM, _VAE_STREAM = 0, 1
BATCH_KEYS = ("input_ids", "labels", "segment_ids", "positions", "image_loss_mask", "image_tokens", "images",
              "image_slots")


def train_step_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Defaults of ``config.train_step``."""
    cfg = ml_collections.ConfigDict(dict(
        microbatches=1,  # gradient accumulation: the global batch is processed in this many slices
        nonfinite="skip",  # skip | stop: what the trainer does after a step with a non-finite loss/gradient
        # LM head slots per row (0: every position): each row's text targets gathered into this many, a speed
        # hint for data whose rows hold at most that many; a batch with a row over it runs the LM head on every
        # position (both paths are compiled), so the loss is the same either way.
        text_positions=0,
    ))
    cfg.update(overrides)
    return cfg


def _step_options(config) -> ml_collections.ConfigDict:
    options = train_step_config()
    options.update(config.get("train_step") or {})
    if options.nonfinite not in NONFINITE_MODES:
        raise ValueError(f"train_step.nonfinite={options.nonfinite!r}: expected one of {NONFINITE_MODES}")
    if options.microbatches < 1:
        raise ValueError(f"train_step.microbatches={options.microbatches} must be >= 1")
    if options.text_positions < 0:
        raise ValueError(f"train_step.text_positions={options.text_positions} must be >= 0 (0: every position)")
    return options


def image_tokens_from_pixels(vae: AutoencoderKL, vae_params, images, image_slots, keys, patch_size: int):
    """Frozen VAE: images [B, K, H, W, 3] -> tokens at each row's placeholder slots [B, T, D] (zeros where
    ``image_slots`` is -1); a stochastic posterior samples with each row's key."""
    b, k = images.shape[:2]
    vcfg = vae.cfg
    mean, logvar = vae.apply({"params": vae_params}, images.reshape(b * k, *images.shape[2:]).astype(vcfg.dtype),
                             method=AutoencoderKL.encode)
    eps = None
    if not vcfg.deterministic:
        eps = jax.vmap(lambda key: jax.random.normal(key, (k, *mean.shape[1:])))(keys).reshape(mean.shape)
    z = sample_posterior(mean, logvar, vcfg, eps=eps)
    tokens = patchify(to_model_latents(z, vcfg), patch_size)  # [B·K, h·w, D]
    tokens = jax.lax.stop_gradient(tokens.reshape(b, -1, tokens.shape[-1]))
    picked = jnp.take_along_axis(tokens, jnp.maximum(image_slots, 0)[..., None], axis=1)
    return jnp.where((image_slots >= 0)[..., None], picked, 0.0)


def pixel_image_positions(vae_cfg, images_shape, patch_size: int) -> int:
    """Image tokens a row of a pixel batch ``images_shape`` [B, K, H, W, 3] holds at most: K x tokens per image."""
    pixels_per_token = downsample_factor(vae_cfg) * patch_size
    _, k, h, w, _ = images_shape
    return k * (h // pixels_per_token) * (w // pixels_per_token)


def batch_shardings(batch, mesh: Mesh, rules=LOGICAL_AXIS_RULES):
    """Every batch array split along its leading (row) axis."""
    sharding = batch_sharding(mesh, rules)
    return jax.tree.map(lambda _: sharding, batch)


def make_train_step(config, model: NextStep, optimizer: optax.GradientTransformation, mesh: Mesh, *,
                    vae: AutoencoderKL | None = None, image_positions: int | None = None,
                    rules=LOGICAL_AXIS_RULES, donate: bool = True):
    """The jitted ``step(state, batch, vae_params=None) -> (state, metrics)`` on ``mesh``.

    ``config`` is the whole config (``model``, ``train_step``; ``data`` when present is validated against
    the mesh). ``vae`` is needed for pixel batches. Shardings: the state's from its logical names, the batch
    along rows, the metrics replicated. Compile it ahead with ``.lower(abstract_state, abstract_batch)``.

    The flow-matching head runs on a row's image targets only, gathered into a static number of slots: for
    pixel batches the row's image slots x tokens per image (the packer never places more); for token batches
    ``image_positions`` when the caller knows a bound on the image targets of any row, else every position.
    The LM head runs on ``train_step.text_positions`` gathered slots when set and every row fits.
    """
    options = _step_options(config)
    validate_mesh(config, mesh, rules)
    cfg = model.cfg
    microbatches = int(options.microbatches)
    state_sharding = jax.tree.map(lambda s: s.sharding, abstract_train_state(cfg, optimizer, mesh, rules))

    def model_loss(params, batch, row_keys, vae_params, totals):
        if "images" in batch:
            if vae is None:
                raise ValueError("a pixel batch (images + image_slots) needs make_train_step(..., vae=...)")
            vae_keys = jax.vmap(lambda key: jax.random.fold_in(key, _VAE_STREAM))(row_keys)
            image_tokens = image_tokens_from_pixels(vae, vae_params, batch["images"], batch["image_slots"],
                                                    vae_keys, cfg.latent_patch_size)
            slots = pixel_image_positions(vae.cfg, batch["images"].shape, cfg.latent_patch_size)
        else:
            image_tokens, slots = batch.get("image_tokens"), image_positions
        text_slots = int(options.text_positions) or None
        fm_keys = jax.vmap(lambda key: jax.random.fold_in(key, _FM_STREAM))(row_keys)
        return model.apply({"params": params}, batch["input_ids"], batch["labels"], image_tokens,
                           batch.get("image_loss_mask"), segment_ids=batch.get("segment_ids"),
                           positions=batch.get("positions"), rng=fm_keys, totals=totals, image_positions=slots,
                           text_positions=text_slots, method=NextStep.loss)

    grad_fn = jax.value_and_grad(model_loss, has_aux=True)

    def loss_and_grads(params, batch, row_keys, vae_params):
        with_images = "images" in batch or "image_tokens" in batch
        totals = loss_counts(cfg, batch["input_ids"], batch["labels"], batch.get("image_loss_mask"),
                             segment_ids=batch.get("segment_ids"), with_images=with_images)
        if microbatches == 1:
            (_, metrics), grads = grad_fn(params, batch, row_keys, vae_params, totals)
            return metrics, grads

        def split(x):  # [B, ...] -> [m, B/m, ...], microbatch j = rows j, j+m, ...: sharding kept
            x = x.reshape(x.shape[0] // microbatches, microbatches, *x.shape[1:])
            return jnp.moveaxis(x, 1, 0)

        def body(carry, micro):
            grads, sums = carry
            (_, metrics), g = grad_fn(params, micro["batch"], micro["keys"], vae_params, totals)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, {k: sums[k] + metrics[k] for k in sums}), None

        zeros = jax.lax.with_sharding_constraint(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
                                                 state_sharding.params)
        sums = {k: jnp.float32(0.0) for k in ("loss", "lm_loss", "im_loss", "lm_gathered")}
        (grads, sums), _ = jax.lax.scan(body, (zeros, sums),
                                        {"batch": jax.tree.map(split, batch), "keys": split(row_keys)})
        return {**sums, "lm_gathered": sums["lm_gathered"] / microbatches, **totals}, grads

    def step(state: TrainState, batch, vae_params=None):
        rows = batch["input_ids"].shape[0]
        if rows % microbatches:
            raise ValueError(f"batch of {rows} rows is not divisible by train_step.microbatches={microbatches}")
        step_key = jax.random.fold_in(state.rng, state.step)
        row_keys = jax.vmap(lambda i: jax.random.fold_in(step_key, i))(jnp.arange(rows))
        metrics, grads = loss_and_grads(state.params, batch, row_keys, vae_params)
        grad_norm = optax.tree.norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
        skipped = state.skipped + (~finite).astype(jnp.int32)
        new_state = state.replace(step=state.step + 1, params=keep(params, state.params),
                                  opt_state=keep(opt_state, state.opt_state), skipped=skipped)
        metrics = {**metrics, "grad_norm": grad_norm, "nonfinite": (~finite).astype(jnp.float32),
                   "skipped": skipped.astype(jnp.float32)}
        return new_state, {k: metrics[k] for k in METRICS}

    replicated = NamedSharding(mesh, PartitionSpec())
    jitted = jax.jit(step, in_shardings=(state_sharding, batch_sharding(mesh, rules), None),
                     out_shardings=(state_sharding, replicated), donate_argnums=(0,) if donate else ())

    def run(state, batch, vae_params=None):
        with use_mesh(mesh, rules):
            return jitted(state, _model_arrays(batch), vae_params)

    def lower(state, batch, vae_params=None):
        with use_mesh(mesh, rules):
            return jitted.lower(state, _model_arrays(batch), vae_params)

    run.lower = lower
    return run


def must_stop(step: int, metrics: dict, options: ml_collections.ConfigDict) -> bool:
    """True (after saying why on stderr) when this step was non-finite and ``nonfinite`` is "stop"."""
    if not (metrics["nonfinite"] and options.nonfinite == "stop"):
        return False
    say(f"step {step}: non-finite loss or gradient (loss={metrics['loss']}, grad_norm={metrics['grad_norm']}); "
        "stopped (train_step.nonfinite='stop') without saving it")
    return True


def _model_arrays(batch) -> dict:
    """The arrays of a packed batch the step reads (a pipeline batch may carry more, e.g. stats)."""
    return {k: v for k, v in batch.items() if k in BATCH_KEYS}
