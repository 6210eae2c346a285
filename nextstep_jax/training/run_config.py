"""The config of a training run: its built-in defaults, how it is resolved, and the checks of the run's own
fields (lengths, periods, places) that every task shares.

Precedence: training defaults < the ``--config`` file < what the init checkpoint and VAE store < ``--config.*``.
From an init checkpoint (``init.source="checkpoint"``) the run takes the model's architecture and special-token
ids and the tokenizer shipped with it; from the VAE folder (``vae_source``) its architecture, and its tokenizer
if the checkpoint brought none (the official tokenizer folder holds both). The numerics and layout fields
(``LAYOUT_FIELDS``) stay the config's.
"""

from __future__ import annotations

from collections.abc import Collection
from pathlib import Path

import ml_collections

from nextstep_jax import configs
from nextstep_jax.checkpoint import read_model_config, read_vae_config, release_files
from nextstep_jax.training.init import InitError, init_config
from nextstep_jax.training.optimizer import optim_config, schedule_config
from nextstep_jax.training.step import train_step_config

# Model and VAE fields that are how we run a model, not what it is: a checkpoint's values never replace the config's.
LAYOUT_FIELDS = ("dtype", "scan_layers", "remat_policy", "loss_chunk_size", "attention_impl", "attention_block_q",
                 "attention_block_kv", "fused_qkv", "fused_mlp", "loss_uses_out_projector")


def train_config() -> ml_collections.ConfigDict:
    """The built-in defaults of a training run: ``configs.default_config()`` plus the training sections."""
    config = configs.default_config()
    config.task = "nextstep"  # what is trained: "nextstep" or "vae" (the image tokenizer)
    config.seed = 0  # parameter init and the per-step random numbers (the data order has data.seed)
    config.total_steps = 1000
    config.optim = optim_config()
    config.schedule = schedule_config()
    config.train_step = train_step_config()
    config.init = init_config()
    config.checkpoint = ml_collections.ConfigDict(dict(every_steps=1000, keep=3))
    config.eval = ml_collections.ConfigDict(dict(
        every_steps=0,  # a sample grid of the prompts every this many steps and at the end; 0 = never
        prompts=(),  # fixed captions, one image each, sampled with the config's sampling section
        seed=0,
        hw=None,  # image size (H, W) of the grid's images; None: sampling.hw
    ))
    # The profiler traces num_steps steps from start_step (counted from 1) into WORKDIR/profile; 0 = off.
    config.profile = ml_collections.ConfigDict(dict(start_step=5, num_steps=0))
    # Peak FLOP/s of one device for MFU; None: known for TPU chips, else MFU is not reported.
    config.peak_flops_per_device = None
    return config


def resolve_config(args, overrides, tasks: Collection[str]) -> ml_collections.ConfigDict:
    """The run's config (see the module docstring); ``config.task`` must be one of ``tasks``."""
    default = train_config()
    config = configs.resolve(args, overrides, default=default)
    if config.task not in tasks:
        raise configs.ConfigError(f"task={config.task!r}: expected one of {sorted(tasks)}")
    stored = stored_settings(config)
    return configs.resolve(args, overrides, default=default, stored=stored) if stored else config


def vae_source(config) -> Path | None:
    """The frozen VAE's folder: ``init.vae``, else the init checkpoint's ``vae/``; None (a scratch VAE) only for
    a model that starts without a checkpoint, since a trained model needs the VAE it was trained with."""
    if config.init.vae:
        return Path(config.init.vae)
    if config.init.source != "checkpoint":
        return None
    folder = Path(config.init.path) / "vae"
    if not folder.is_dir():
        raise InitError(f"init.vae is not set and the init checkpoint {config.init.path} has no vae/ folder: "
                        "name the VAE the model was trained with")
    return folder


def stored_settings(config) -> dict:
    stored = {}
    if config.init.source == "checkpoint":
        path = Path(config.init.path) if config.init.path else None
        if path is None or not path.is_dir():
            raise InitError(f"init.path={config.init.path!r}: no such folder (init.source='checkpoint' needs one)")
        model = read_model_config(path)
        stored["model"] = {k: v for k, v in model.items() if k not in LAYOUT_FIELDS}
        if _has_tokenizer(release_files(path)):
            stored["data"] = {"tokenizer": str(release_files(path))}
    vae = vae_source(config)
    if vae is not None:
        if not vae.is_dir():
            raise InitError(f"init.vae={str(vae)!r}: no such folder")
        stored["vae"] = {k: v for k, v in read_vae_config(vae).items() if k not in LAYOUT_FIELDS}
        if "data" not in stored and _has_tokenizer(release_files(vae)):  # the official tokenizer repo holds both
            stored["data"] = {"tokenizer": str(release_files(vae))}
    return stored


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()


def check_run_fields(config: ml_collections.ConfigDict, args) -> None:
    """The fields of the run itself (lengths, periods, places), before anything is built."""
    def need(ok: bool, field: str, value, what: str) -> None:
        if not ok:
            raise configs.ConfigError(f"{field}={value!r}: {what}")

    for field, value, low in (("total_steps", config.total_steps, 0),
                              ("checkpoint.every_steps", config.checkpoint.every_steps, 1),
                              ("checkpoint.keep", config.checkpoint.keep, 1),
                              ("eval.every_steps", config.eval.every_steps, 0),
                              ("profile.start_step", config.profile.start_step, 1),
                              ("profile.num_steps", config.profile.num_steps, 0)):
        need(isinstance(value, int) and value >= low, field, value, f"must be an integer >= {low}")
    need(config.peak_flops_per_device is None or config.peak_flops_per_device > 0, "peak_flops_per_device",
         config.peak_flops_per_device, "must be > 0 (or None)")
    if args.workdir.exists() and not args.workdir.is_dir():
        raise configs.ConfigError(f"--workdir {args.workdir}: exists and is not a folder")
    if args.export is not None and args.export.exists() and (not args.export.is_dir() or any(args.export.iterdir())):
        raise configs.ConfigError(f"--export {args.export}: exists and is not an empty folder")
