"""NextStep training: ``config.task = "nextstep"`` of ``python -m nextstep_jax.train``, the pieces the shared loop
(``training/loop.py``) asks for.

``prepare(config, args)`` checks the config and builds everything that can be built without writing or
compiling: the mesh of ``config.mesh`` (checked against the model and the batch), the model, the optimizer
(``config.optim``, ``config.schedule``, the released trainer's decay set), the data pipeline, the frozen VAE
and, unless the workdir holds checkpoints to resume from, the initial params (``config.init``). The step is
``training/step.py``'s; the periodic evaluation is a sample grid of ``eval.prompts``
(``training/sample_grids.py``); ``--export`` writes the official release layout.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
from flax import linen as nn

from nextstep_jax import configs
from nextstep_jax.checkpoint import load_vae, release_files
from nextstep_jax.data.pipeline import DataConfig, dataset_specs, image_targets_per_row, make_iterator
from nextstep_jax.data.tokenizer import load_tokenizer
from nextstep_jax.models.nextstep import NextStep, abstract_variables
from nextstep_jax.models.vae import AutoencoderKL
from nextstep_jax.sharding import batch_sharding, make_mesh, shardings_of, validate_mesh
from nextstep_jax.training.distributed import say
from nextstep_jax.training.export import write_release
from nextstep_jax.training.init import initial_params
from nextstep_jax.training.optimizer import make_optimizer, nextstep_layer_norm_paths
from nextstep_jax.training.run_config import check_run_fields, vae_source
from nextstep_jax.training.sample_grids import SampleGrids, check_prompts
from nextstep_jax.training.state import abstract_train_state, init_train_state
from nextstep_jax.training.step import make_train_step
from nextstep_jax.training.step_meter import StepMeter
from nextstep_jax.training.workdir import SAMPLES_DIR, has_checkpoints


def optimizer_for(config: ml_collections.ConfigDict):
    """(optax transformation, LR schedule) of the run: ``config.optim`` and ``config.schedule`` over the model's
    parameters, with the official decay set found from the model's LayerNorm modules."""
    return make_optimizer(config.optim, config.schedule, nn.unbox(abstract_variables(config.model))["params"],
                          total_steps=config.total_steps, layer_norm_paths=nextstep_layer_norm_paths(config.model))


@dataclasses.dataclass
class NextStepTask:
    config: ml_collections.ConfigDict
    workdir: Path
    export_to: Path | None
    progress: bool
    mesh: Any
    model: NextStep
    optimizer: Any
    schedule: Callable
    data_config: DataConfig
    data: Any  # the data iterator
    tokenizer_path: str
    vae: AutoencoderKL
    vae_params: Any
    initial_params: Any  # None when the workdir holds checkpoints to resume from
    meter: StepMeter
    samples: SampleGrids
    step_name: str = "train step"

    @property
    def pixels(self) -> bool:
        return self.data_config.image_input == "pixels"

    def abstract_state(self):
        return abstract_train_state(self.config.model, self.optimizer, self.mesh)

    def initial_state(self):
        params, self.initial_params = self.initial_params, None  # the state holds them from here on
        if params is None:  # the workdir held only checkpoints that were never completed
            params = _initial_params(self.config, self.mesh)
        return init_train_state(self.config.model, self.optimizer, self.mesh, seed=self.config.seed, params=params)

    def train_step(self):
        return make_train_step(self.config, self.model, self.optimizer, self.mesh,
                               vae=self.vae if self.pixels else None,
                               image_positions=image_targets_per_row(self.data_config))

    def step_extra(self):
        return self.vae_params if self.pixels else None

    def global_batch(self, local: dict) -> dict:
        return {k: jax.make_array_from_process_local_data(self._batch_sharding, v) for k, v in local.items()}

    @functools.cached_property
    def _batch_sharding(self):
        return batch_sharding(self.mesh)

    def measure(self, local: dict, seconds: float) -> dict:
        return self.meter.measure(local, self.data.metrics(), seconds)

    def evaluation_due(self, step: int) -> bool:
        return self.samples.due(step)

    def evaluate(self, step: int, params) -> dict:
        return self.samples.write(step, params)

    def export(self, params) -> None:
        """The trained model, its VAE, tokenizer and sampling settings in the official release layout; from an
        init release, the fields of its config.json that we do not model are kept."""
        config = self.config
        base = None
        if config.init.source == "checkpoint":
            path = release_files(config.init.path) / "config.json"
            base = json.loads(path.read_text()) if path.is_file() else None
        write_release(self.export_to, config.model, params, config.vae, self.vae_params,
                      tokenizer=self.tokenizer_path, sampling=config.sampling, base_config=base)
        say(f"exported the model to {self.export_to}")


def prepare(config: ml_collections.ConfigDict, args) -> NextStepTask:
    check_run_fields(config, args)
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
    check_prompts(config, tokenizer_path)
    # Loaded now, so that a bad init source is refused before anything is written; not when resuming.
    params = None if has_checkpoints(args.workdir) else _initial_params(config, mesh)
    vae = AutoencoderKL(config.vae)
    vae_params = _vae_params(config, vae, mesh, _key(config.seed, 1))
    return NextStepTask(config=config, workdir=args.workdir, export_to=args.export, progress=not args.no_progress,
                        mesh=mesh, model=NextStep(config.model), optimizer=optimizer, schedule=schedule,
                        data_config=data_config, data=data, tokenizer_path=tokenizer_path, vae=vae,
                        vae_params=vae_params, initial_params=params,
                        meter=StepMeter(config, data_config, config.model),
                        samples=SampleGrids(config, tokenizer_path, vae_params, args.workdir / SAMPLES_DIR))


def _initial_params(config, mesh):
    return initial_params(config.init, config.model, _key(config.seed, 0), mesh=mesh)


def _key(seed: int, purpose: int):
    """The root key of one purpose (0: model init, 1: scratch VAE init; the steps use the train state's)."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), purpose)


def _vae_params(config, vae, mesh, key):
    """The frozen VAE's params on ``mesh``: loaded from ``vae_source(config)``, else a scratch init."""
    source = vae_source(config)
    if source is not None:
        return load_vae(source, mesh=mesh)[1]
    say("init.vae is not set: the frozen VAE has random weights (fine for tests; name a trained one to learn "
        "real images)")
    size = config.data.image_size
    init = lambda k: vae.init(k, jnp.zeros((1, size, size, 3), jnp.float32))
    shardings = shardings_of(jax.eval_shape(init, key), mesh)["params"]
    return jax.jit(lambda k: nn.unbox(init(k))["params"], out_shardings=shardings)(key)
