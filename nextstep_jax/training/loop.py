"""The training loop every task shares: restore or start, compile, step, measure, evaluate, checkpoint, export.

    code = train(task)   # 0 done, 1 stopped at a non-finite step (train_step.nonfinite="stop"), 2 bad checkpoint

A task (``training/nextstep_task.py``, ``training/vae_task.py``) is everything one kind of training builds
before anything is written or compiled; the loop asks it for the pieces that differ (the ``Task`` protocol).
The loop writes the resolved config, resumes from the newest complete checkpoint of the workdir with its data
iterator (so the steps after it repeat an uninterrupted run exactly), writes one metrics line per step,
checkpoints every ``checkpoint.every_steps`` steps, on SIGTERM and at the end, and traces ``config.profile``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any, Callable, Protocol

import jax
import ml_collections

from nextstep_jax.training.checkpointing import CheckpointRestoreError, StopSignal, TrainCheckpointer
from nextstep_jax.training.distributed import say
from nextstep_jax.training.metrics import MetricsWriter
from nextstep_jax.training.optimizer import averaged_params
from nextstep_jax.training.profiler import Profiler
from nextstep_jax.training.step import must_stop
from nextstep_jax.training.workdir import CHECKPOINTS_DIR, PROFILE_DIR, write_config


class Task(Protocol):
    config: ml_collections.ConfigDict  # the resolved config (total_steps, checkpoint, profile, train_step)
    workdir: Path
    export_to: Path | None  # write the trained model here at the end
    progress: bool  # show a progress bar
    data: Any  # the data iterator: next() gives a process-local batch; metrics(); checkpointable state
    schedule: Callable  # the learning rate of update n
    step_name: str  # what the compile message calls the step

    def abstract_state(self) -> Any: ...  # shapes and shardings of the train state, to restore into

    def initial_state(self) -> Any: ...  # step 0

    def train_step(self) -> Callable: ...  # step(state, batch, extra) -> (state, metrics), with .lower

    def step_extra(self) -> Any: ...  # the step's third argument (frozen VAE params, perceptual net, None)

    def global_batch(self, local: dict) -> dict: ...  # the step's global arrays from this process's batch

    def measure(self, local: dict, seconds: float) -> dict: ...  # throughput and data figures of a step

    def evaluation_due(self, step: int) -> bool: ...

    def evaluate(self, step: int, params) -> dict: ...  # writes its files; scalars for the metrics line

    def export(self, params) -> None: ...


def train(task: Task) -> int:
    config, workdir = task.config, task.workdir
    write_config(workdir, config)
    checkpoints = TrainCheckpointer(workdir / CHECKPOINTS_DIR, every_steps=config.checkpoint.every_steps,
                                    keep=config.checkpoint.keep)
    try:
        restored = checkpoints.restore_latest(task.abstract_state(), task.data)
    except CheckpointRestoreError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if restored is None:
        start, state = 0, task.initial_state()
    else:
        start, state = restored
        say(f"resuming from step {start} ({checkpoints.directory / str(start)})")
    step_fn, extra = task.train_step(), task.step_extra()

    compiled, code = False, 0
    with StopSignal() as stop, Profiler(config.profile, workdir / PROFILE_DIR) as profiler, \
            MetricsWriter(workdir, total_steps=config.total_steps, start_step=start, progress=task.progress) as writer:
        step, last = start, time.perf_counter()
        while step < config.total_steps:
            step += 1
            profiler.before(step)
            local = next(task.data)
            batch = task.global_batch(local)
            if not compiled:  # ahead of the first step, so that its time is a step's time; the jitted call
                # below reuses this executable (jax_log_compiles reports one compile of the step)
                began = time.perf_counter()
                step_fn.lower(state, batch, extra).compile()
                say(f"compiled the {task.step_name} in {time.perf_counter() - began:.1f} s")
                compiled, last = True, time.perf_counter()
            state, metrics = step_fn(state, batch, extra)
            values = {k: float(v) for k, v in jax.device_get(metrics).items()}
            skipped_before = values["skipped"] - values["nonfinite"]
            values["lr"] = float(task.schedule(step - 1 - skipped_before))
            values.update(task.measure(local, time.perf_counter() - last))
            stopping = must_stop(step, values, config.train_step)
            if not stopping and task.evaluation_due(step):
                values.update(task.evaluate(step, averaged_params(state.opt_state, state.params)))
            writer.write(step, values)
            profiler.after(step, metrics)
            if stopping:
                code = 1
                break
            checkpoints.save(step, state, task.data)
            if checkpoints.should_stop(step, stop):
                say(f"stop requested: saving step {step}")
                break
            last = time.perf_counter()  # the next step's time starts here: evaluations are not steps
        if code == 0:
            checkpoints.save(step, state, task.data, force=True)  # no-op when this step is already saved
    checkpoints.close()
    if code == 0 and task.export_to is not None:
        task.export(averaged_params(state.opt_state, state.params))
    return code
