"""Train NextStep: ``python -m nextstep_jax.train --config=configs/X.py --workdir DIR [--config.a.b=v ...]``.

    python -m nextstep_jax.train --config=configs/tiny.py --workdir runs/tiny      # a CPU, the built-in shapes
    python -m nextstep_jax.train --config=configs/14b.py --workdir /runs/14b --config.total_steps=12 \\
        --config.checkpoint.every_steps=4
    python -m nextstep_jax.train --config=configs/tiny.py --workdir runs/tiny --export runs/tiny/release

Top to bottom: resolve the config (built-in training defaults < the file < what the init checkpoint and VAE
store < ``--config.*``); join the other processes of a multi-host run; build the mesh of ``config.mesh`` and
check it against the model and the batch; build the model, optimizer and data pipeline; restore the newest
checkpoint of the workdir, or initialise (``config.init``); compile the step; train for ``config.total_steps``
steps; export when asked. ``config.task`` selects what is trained: "nextstep" (this file) or "vae" (the image
tokenizer, ``training/vae_task.py``).

The workdir holds ``config.json`` (the resolved config), ``checkpoints/`` (every ``checkpoint.every_steps``
steps, on SIGTERM and at the end), ``metrics.jsonl`` and ``tensorboard/`` (every step), ``samples/`` (a grid of
``eval.prompts`` every ``eval.every_steps`` steps) and ``profile/`` (``profile.num_steps`` steps from
``profile.start_step``). Re-running the same command resumes from the newest complete checkpoint with the same
data order and random numbers, so the steps after it repeat an uninterrupted run exactly.

Exit status: 0 done; 2 bad input (one line naming the file, field or value; nothing written, nothing
compiled); 1 stopped at a non-finite step under ``train_step.nonfinite="stop"``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from jax.experimental import multihost_utils

from nextstep_jax import configs
from nextstep_jax.checkpoint import load_vae, read_model_config, read_vae_config, release_files
from nextstep_jax.data.pipeline import DataConfig, dataset_specs, make_iterator
from nextstep_jax.data.tokenizer import load_tokenizer
from nextstep_jax.generation.generator import Generator
from nextstep_jax.generation.image_files import grid, write_png
from nextstep_jax.generation.prompts import PromptBuilder, PromptTokenizer
from nextstep_jax.generation.settings import SamplingSettings
from nextstep_jax.io.atomic import write_file
from nextstep_jax.models.layouts import for_decoding
from nextstep_jax.models.nextstep import NextStep, abstract_variables
from nextstep_jax.models.vae import AutoencoderKL
from nextstep_jax.plan import CHIPS
from nextstep_jax.sharding import batch_sharding, make_mesh, shardings_of, validate_mesh
from nextstep_jax.training import distributed
from nextstep_jax.training.checkpointing import CheckpointRestoreError, StopSignal, TrainCheckpointer
from nextstep_jax.training.export import write_release
from nextstep_jax.training.flops import train_step_flops
from nextstep_jax.training.init import InitError, init_config, initial_params
from nextstep_jax.training.metrics import MetricsWriter
from nextstep_jax.training.optimizer import make_optimizer, nextstep_layer_norm_paths, optim_config, schedule_config
from nextstep_jax.training.state import abstract_train_state, init_train_state
from nextstep_jax.training.step import make_train_step, must_stop, train_step_config
from nextstep_jax.training.vae_task import prepare_vae, train_vae

WORKDIR_CONFIG = "config.json"
CHECKPOINTS_DIR, SAMPLES_DIR, PROFILE_DIR = "checkpoints", "samples", "profile"


def train_config() -> ml_collections.ConfigDict:
    """The built-in defaults of a training run: ``configs.default_config()`` plus the training sections."""
    config = configs.default_config()
    config.task = "nextstep"  # what is trained: a key of TASKS
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


# ------------------------------------------------------------------------------------------------ command line


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    configs.add_config_arguments(p, required=True)
    p.add_argument("--workdir", required=True, type=Path,
                   help="checkpoints, metrics, samples and the resolved config go here; rerunning resumes")
    p.add_argument("--export", type=Path, metavar="DIR",
                   help="after training, write the model to DIR in the official release layout (config.json, "
                        "safetensors, tokenizer, vae/); with --config.total_steps at or below the newest "
                        "checkpoint it exports that checkpoint without training")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (metrics are still written)")
    multi = p.add_argument_group("multi-host (default: NEXTSTEP_COORDINATOR / _NUM_PROCESSES / _PROCESS_ID, "
                                 "else what the cluster launcher tells JAX, else one process)")
    multi.add_argument("--coordinator", help="host:port of process 0")
    multi.add_argument("--num_processes", type=int)
    multi.add_argument("--process_id", type=int)
    return p


def main(argv=None) -> int:
    args, overrides = configs.parse_args(_parser(), argv)
    try:
        config = resolve_config(args, overrides)
        distributed.initialize(args.coordinator, args.num_processes, args.process_id)  # before JAX is asked for devices
        task = TASKS[config.task]
        run = task.prepare(config, args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return task.train(run)


def resolve_config(args, overrides) -> ml_collections.ConfigDict:
    """Training defaults < ``--config`` file < what the init checkpoint and VAE store < ``--config.*``.

    From an init checkpoint (``init.source="checkpoint"``) the run takes the model's architecture and
    special-token ids and the tokenizer shipped with it; from the VAE folder (``vae_source``) its architecture,
    and its tokenizer if the checkpoint brought none (the official tokenizer folder holds both). The numerics
    and layout fields (dtype, scan_layers, remat_policy, ...) stay the config's.
    """
    default = train_config()
    config = configs.resolve(args, overrides, default=default)
    if config.task not in TASKS:
        raise configs.ConfigError(f"task={config.task!r}: expected one of {sorted(TASKS)}")
    stored = stored_settings(config)
    return configs.resolve(args, overrides, default=default, stored=stored) if stored else config


# Model and VAE fields that are how we run a model, not what it is: a checkpoint's values never replace the config's.
LAYOUT_FIELDS = ("dtype", "scan_layers", "remat_policy", "loss_chunk_size", "attention_impl", "fused_qkv",
                 "fused_mlp", "loss_uses_out_projector")


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


# ------------------------------------------------------------------------------------------- the NextStep task


@dataclasses.dataclass
class NextStepRun:
    """A validated run: everything built that can be built without writing or compiling."""

    config: ml_collections.ConfigDict
    workdir: Path
    export: Path | None
    progress: bool
    mesh: Any
    model: Any
    optimizer: Any
    schedule: Callable
    data_config: Any
    data: Any  # the data iterator
    tokenizer_path: str
    vae: Any
    vae_params: Any
    initial_params: Any  # None when the workdir holds checkpoints to resume from


def optimizer_for(config: ml_collections.ConfigDict):
    """(optax transformation, LR schedule) of the run: ``config.optim`` and ``config.schedule`` over the model's
    parameters, with the official decay set found from the model's LayerNorm modules."""
    return make_optimizer(config.optim, config.schedule, nn.unbox(abstract_variables(config.model))["params"],
                          total_steps=config.total_steps, layer_norm_paths=nextstep_layer_norm_paths(config.model))


def prepare_nextstep(config: ml_collections.ConfigDict, args) -> NextStepRun:
    _check_run_fields(config, args)
    if not config.data.tokenizer:
        raise configs.ConfigError("data.tokenizer is not set: name the text tokenizer (a folder, a file or "
                                  "'builtin:bytes'); init.source='checkpoint' brings the checkpoint's own")
    mesh = make_mesh(dict(config.mesh))
    validate_mesh(config, mesh)
    data_config = DataConfig.from_config(config)
    datasets = dataset_specs(config)
    if not datasets:
        raise configs.ConfigError("data.datasets is empty: name at least one dataset")
    tokenizer_path = str(config.data.tokenizer)
    data = make_iterator(data_config, datasets, load_tokenizer(tokenizer_path))
    optimizer, schedule = optimizer_for(config)
    _check_prompts(config, tokenizer_path)
    # Loaded now, so that a bad init source is refused before anything is written; not when resuming.
    params = None if _has_checkpoints(args.workdir / CHECKPOINTS_DIR) else _initial_params(config, mesh)
    vae = AutoencoderKL(config.vae)
    vae_params = _vae_params(config, vae, mesh, _key(config.seed, 1))
    return NextStepRun(config=config, workdir=args.workdir, export=args.export, progress=not args.no_progress,
                       mesh=mesh, model=NextStep(config.model), optimizer=optimizer, schedule=schedule,
                       data_config=data_config, data=data, tokenizer_path=tokenizer_path, vae=vae,
                       vae_params=vae_params, initial_params=params)


def train_nextstep(run: NextStepRun) -> int:
    config, workdir, data = run.config, run.workdir, run.data
    write_config(workdir, config)
    checkpoints = TrainCheckpointer(workdir / CHECKPOINTS_DIR, every_steps=config.checkpoint.every_steps,
                                    keep=config.checkpoint.keep)
    try:
        restored = checkpoints.restore_latest(abstract_train_state(config.model, run.optimizer, run.mesh), data)
    except CheckpointRestoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    params, run.initial_params = run.initial_params, None  # the state holds them from here on
    if restored is None:
        if params is None:  # the workdir held only checkpoints that were never completed
            params = _initial_params(config, run.mesh)
        start, state = 0, init_train_state(config.model, run.optimizer, run.mesh, seed=config.seed, params=params)
    else:
        start, state = restored
        _say(f"resuming from step {start} ({checkpoints.directory / str(start)})")
    del params
    pixels = run.data_config.image_input == "pixels"
    vae_params = run.vae_params if pixels else None
    step_fn = make_train_step(config, run.model, run.optimizer, run.mesh, vae=run.vae if pixels else None)
    sharding = batch_sharding(run.mesh)
    samples = SampleGrids(config, run.tokenizer_path, run.vae_params, workdir / SAMPLES_DIR)
    meter = StepMeter(config, run.data_config, run.schedule, run.model.cfg)

    compiled, code = False, 0
    with StopSignal() as stop, Profiler(config.profile, workdir / PROFILE_DIR) as profiler, \
            MetricsWriter(workdir, total_steps=config.total_steps, start_step=start, progress=run.progress) as writer:
        step = start
        while step < config.total_steps:
            step += 1
            profiler.before(step)
            local = next(data)
            batch = {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local.items()}
            if not compiled:  # ahead of the first step, so that its time is a step's time
                began = time.perf_counter()
                step_fn.lower(state, batch, vae_params).compile()
                _say(f"compiled the train step in {time.perf_counter() - began:.1f} s")
                compiled = True
                meter.restart()
            state, metrics = step_fn(state, batch, vae_params)
            values = meter.measure(step, metrics, local, data.metrics())
            writer.write(step, values)
            profiler.after(step, metrics)
            if must_stop(step, values, config.train_step):
                code = 1
                break
            checkpoints.save(step, state, data)
            if samples.due(step):
                samples.write(step, state.params)
            if checkpoints.should_stop(step, stop):
                _say(f"stop requested: saving step {step}")
                break
        if code == 0:
            checkpoints.save(step, state, data, force=True)  # no-op when this step is already saved
            if start < step == config.total_steps:
                samples.write(step, state.params)
    checkpoints.close()
    if code == 0 and run.export is not None:
        export_model(run, state.params)
    return code


def _initial_params(config, mesh):
    return initial_params(config.init, config.model, _key(config.seed, 0), mesh=mesh)


def _key(seed: int, purpose: int):
    """The root key of one purpose (0: model init, 1: scratch VAE init; the steps use the train state's)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), purpose)


def _has_checkpoints(folder: Path) -> bool:
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _vae_params(config, vae, mesh, key):
    """The frozen VAE's params on ``mesh``: loaded from ``vae_source(config)``, else a scratch init."""
    source = vae_source(config)
    if source is not None:
        return load_vae(source, mesh=mesh)[1]
    _say("init.vae is not set: the frozen VAE has random weights (fine for tests; name a trained one to learn "
         "real images)")
    size = config.data.image_size
    init = lambda k: vae.init(k, jnp.zeros((1, size, size, 3), jnp.float32))
    shardings = shardings_of(jax.eval_shape(init, key), mesh)["params"]
    return jax.jit(lambda k: nn.unbox(init(k))["params"], out_shardings=shardings)(key)


# ----------------------------------------------------------------------------------------------------- helpers


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _check_run_fields(config: ml_collections.ConfigDict, args) -> None:
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


def _check_prompts(config: ml_collections.ConfigDict, tokenizer_path: str) -> None:
    """The sample-grid prompts turn into prompt rows with the sampling settings."""
    if not config.eval.every_steps or not config.eval.prompts:
        return
    PromptBuilder(PromptTokenizer(tokenizer_path), config.model, config.vae).rows(list(config.eval.prompts),
                                                                              eval_settings(config))


def eval_settings(config):
    """The sampling settings of the sample grids: the ``sampling`` section at ``eval.hw``."""
    changes = {"hw": tuple(config.eval.hw)} if config.eval.hw else {}
    return SamplingSettings.from_config(config.sampling, **changes)


def write_config(workdir: Path, config: ml_collections.ConfigDict) -> None:
    """The resolved config as JSON (process 0; atomically). A resumed run with other settings is reported."""
    if jax.process_index() != 0:
        return
    workdir.mkdir(parents=True, exist_ok=True)
    path = workdir / WORKDIR_CONFIG
    resolved = json.loads(json.dumps(config.to_dict(), default=str))
    if path.is_file():
        previous = json.loads(path.read_text())
        changed = sorted(_changed_fields(previous, resolved))
        if changed:
            _say(f"{path}: this run changes {', '.join(changed)}")
    write_file(path, (json.dumps(resolved, indent=1, sort_keys=True) + "\n").encode())


def _changed_fields(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _changed_fields(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}")
    return out


def peak_flops(config) -> float | None:
    """Peak FLOP/s of one device: the config's, else the TPU chip's (``plan.CHIPS``), else unknown."""
    if config.peak_flops_per_device:
        return float(config.peak_flops_per_device)
    kind = jax.devices()[0].device_kind.lower()  # e.g. "tpu v5p", "tpu v5 lite", "tpu v6 lite"
    for prefix, chip in (("tpu v4", "v4"), ("tpu v5 lite", "v5e"), ("tpu v5", "v5p"), ("tpu v6 lite", "v6e")):
        if kind.startswith(prefix):
            return CHIPS[chip]["peak_flops"]
    return None


class StepMeter:
    """The per-step metrics: the step's own (loss, lm_loss, im_loss, grad_norm, nonfinite, skipped steps) plus
    the lr of its update, step_time (wall time since the previous step's metrics arrived), tokens/s (the batch's
    token slots; data/pad_fraction says how many are padding), images/s (image blocks in the batch), the model
    FLOP rate and MFU, and the data pipeline's cumulative counts, all summed over processes."""

    def __init__(self, config, data_config, schedule, model_cfg):
        self._schedule = schedule
        self._boi = int(model_cfg.boi)
        self._tokens = int(config.data.batch_size) * int(data_config.seq_len)
        flops = train_step_flops(model_cfg, config.data.batch_size, data_config.seq_len)
        self._model_flops = flops["model"]
        peak = peak_flops(config)
        self._peak = None if peak is None else peak * jax.device_count()
        self._last = time.perf_counter()

    def restart(self) -> None:
        """The next step is timed from now (after compiling)."""
        self._last = time.perf_counter()

    def measure(self, step: int, metrics, local_batch, data_metrics: dict) -> dict:
        values = {k: float(v) for k, v in jax.device_get(metrics).items()}
        now = time.perf_counter()
        seconds, self._last = now - self._last, now
        skipped_before = values["skipped"] - values["nonfinite"]
        values["lr"] = float(self._schedule(step - 1 - skipped_before))
        skipped_data = sum(v for k, v in data_metrics.items() if k.startswith("data/skipped/"))
        counts = np.array([(local_batch["input_ids"] == self._boi).sum(), skipped_data,
                           data_metrics["data/documents"]], np.float64)
        if jax.process_count() > 1:
            counts = np.asarray(multihost_utils.process_allgather(counts)).sum(0)
        values.update({"step_time": seconds, "tokens_per_s": self._tokens / seconds,
                       "images_per_s": float(counts[0]) / seconds, "model_tflops_per_s":
                       self._model_flops / seconds / 1e12, "data/skipped": float(counts[1]),
                       "data/documents": float(counts[2]), "data/pad_fraction": data_metrics["data/pad_fraction"]})
        if self._peak:
            values["mfu"] = self._model_flops / seconds / self._peak
        return values


class Profiler:
    """A JAX profiler trace of ``num_steps`` steps from ``start_step`` into ``folder`` (TensorBoard's profile
    plugin or Perfetto read it)."""

    def __init__(self, section, folder: Path):
        self._first, self._last = section.start_step, section.start_step + section.num_steps - 1
        self._folder = folder
        self._active = False

    def __enter__(self) -> Profiler:
        return self

    def before(self, step: int) -> None:
        if step == self._first and self._last >= self._first:
            self._folder.mkdir(parents=True, exist_ok=True)
            jax.profiler.start_trace(str(self._folder))
            self._active = True

    def after(self, step: int, outputs) -> None:
        if self._active and step >= self._last:
            self._stop(outputs)

    def _stop(self, outputs=None) -> None:
        jax.block_until_ready(outputs)
        jax.profiler.stop_trace()
        self._active = False
        _say(f"profile of steps {self._first}-{self._last} written to {self._folder}")

    def __exit__(self, *exc_info) -> None:
        if self._active:
            self._stop()


class SampleGrids:
    """Every ``eval.every_steps`` steps (and at the end), one image per ``eval.prompts`` caption through the
    generation code, as one PNG grid ``samples/step_<step>.png`` (process 0 writes; single-process runs only:
    the generation program gathers its images on one host)."""

    def __init__(self, config, tokenizer_path: str, vae_params, folder: Path):
        self._config = config
        self._tokenizer_path = tokenizer_path
        self._vae_params = vae_params
        self._folder = folder
        self._every = config.eval.every_steps
        self.enabled = bool(self._every and config.eval.prompts)
        self._written: set[int] = set()
        self._generator = None  # compiled once; its params are set for each grid and dropped after it
        if self.enabled and jax.process_count() > 1:
            _say("sample grids are written by single-process runs only; eval.every_steps ignored")
            self.enabled = False

    def due(self, step: int) -> bool:
        return self.enabled and step % self._every == 0

    def write(self, step: int, params) -> None:
        if not self.enabled or step in self._written:
            return
        config = self._config
        started = time.perf_counter()
        if self._generator is None:
            self._generator = Generator(config.model, params, config.vae, self._vae_params,
                                        PromptTokenizer(self._tokenizer_path))
        else:
            self._generator.variables = {"params": for_decoding(config.model, params)[1]}
        result = self._generator.generate(list(config.eval.prompts), eval_settings(config), seed=config.eval.seed)
        self._generator.variables = None
        path = self._folder / f"step_{step:07d}.png"
        write_png(path, grid(list(result.images)), {"step": str(step), "prompts": json.dumps(list(config.eval.prompts)),
                                                    "seed": str(config.eval.seed)})
        self._written.add(step)
        _say(f"step {step}: sample grid {path} ({time.perf_counter() - started:.1f} s)")


def export_model(run: NextStepRun, params) -> None:
    """The trained model, its VAE, tokenizer and sampling settings in the official release layout; from an
    init release, the fields of its config.json that we do not model are kept."""
    config = run.config
    base = None
    if config.init.source == "checkpoint":
        path = release_files(config.init.path) / "config.json"
        base = json.loads(path.read_text()) if path.is_file() else None
    write_release(run.export, config.model, params, config.vae, run.vae_params, tokenizer=run.tokenizer_path,
                  sampling=config.sampling, base_config=base)
    _say(f"exported the model to {run.export}")


class Task(NamedTuple):
    """What ``config.task`` selects: ``prepare(config, args)`` validates everything and returns the run;
    ``train(run)`` trains it and returns the exit status."""

    prepare: Callable
    train: Callable


TASKS = {"nextstep": Task(prepare_nextstep, train_nextstep), "vae": Task(prepare_vae, train_vae)}
USER_ERRORS = (ValueError, OSError)  # ConfigError, InitError, CheckpointError, ... are ValueErrors


if __name__ == "__main__":
    sys.exit(main())
