"""Training checkpoints: Orbax ``CheckpointManager`` (async, every N steps, keep-N, atomic) holding the train
state pytree (params, optimizer state, step, RNG: whatever the state holds), the Grain iterator state and a
small JSON record.

    ckpt = TrainCheckpointer(workdir / "checkpoints", every_steps=config.checkpoint.every_steps,
                             keep=config.checkpoint.keep)
    restored = ckpt.restore_latest(abstract_like(state), data_iterator)   # None on a fresh run
    with StopSignal() as stop:
        for step in ...:
            ...
            ckpt.save(step, state, data_iterator)       # writes only every N steps, in the background
            if ckpt.should_stop(step, stop):
                ckpt.save(step, state, data_iterator, force=True); break
    ckpt.close()                                         # waits for the last write

Step ``s`` holds the state after ``s`` optimizer steps. Orbax writes each step into a temporary folder and
renames it when complete, so a run killed while saving leaves only a ``<step>.orbax-checkpoint-tmp-*`` folder:
it is reported and ignored. A complete-looking step that cannot be read is reported in one line, moved aside to
``<step>.corrupt-<time>`` (so that step can be written again) and the previous step is used.
"""

from __future__ import annotations

import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

STATE, DATA, RECORD = "state", "data", "record"
_PARTIAL = re.compile(r"^(\d+)\.orbax-checkpoint-tmp")


def checkpoint_config() -> ml_collections.ConfigDict:
    """Defaults of ``config.checkpoint`` (the official period: every 2500 steps)."""
    return ml_collections.ConfigDict(dict(every_steps=2500, keep=3, async_save=True))


class CheckpointRestoreError(RuntimeError):
    """Checkpoints exist but none can be read (e.g. a config that changed the state's shapes)."""


def abstract_like(tree: Any) -> Any:
    """ShapeDtypeStructs with the shardings of ``tree``: the restore target, so every array is read straight
    into its final sharding (a different mesh or layout than the one that saved it is fine)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def _say(message: str) -> None:
    if jax.process_index() == 0:
        print(message, file=sys.stderr, flush=True)


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:240] if text else ''}".rstrip(": ")


class TrainCheckpointer:
    def __init__(self, directory: str | Path, *, every_steps: int, keep: int, async_save: bool = True):
        if every_steps < 1 or keep < 1:
            raise ValueError(f"checkpoint.every_steps ({every_steps}) and checkpoint.keep ({keep}) must be >= 1")
        self.directory = Path(directory).absolute()
        self.every_steps = every_steps
        self._report_partial()
        # The save period is decided in save() (Orbax's own policy would also save the first step it sees).
        self._manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, cleanup_tmp_directories=True))

    def _report_partial(self) -> None:
        if not self.directory.is_dir():
            return
        for entry in sorted(self.directory.iterdir()):
            if _PARTIAL.match(entry.name):
                _say(f"checkpoint {entry}: incomplete (the run stopped while writing it); ignored")

    @property
    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, data_iterator: grain.DatasetIterator | None = None, *,
             force: bool = False) -> bool:
        """Start writing step ``step`` if it is due (every N steps) or ``force``, unless that step exists;
        True if a save started. The iterator state is captured now, so the loop may advance it at once."""
        if not (force or step % self.every_steps == 0) or step in self._manager.all_steps():
            return False
        items = {STATE: ocp.args.StandardSave(state), RECORD: ocp.args.JsonSave({"step": int(step)})}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointSave(data_iterator)
        return self._manager.save(int(step), args=ocp.args.Composite(**items), force=True)

    def restore_latest(self, abstract_state: Any, data_iterator: grain.DatasetIterator | None = None
                       ) -> tuple[int, Any] | None:
        """(step, state) of the newest readable checkpoint, with ``data_iterator`` set to its position;
        None when there is no checkpoint. Unreadable newer steps are reported and moved aside."""
        failed: list[tuple[int, str]] = []
        for step in sorted(self._manager.all_steps(), reverse=True):
            try:
                state = self._restore(step, abstract_state, data_iterator)
            except Exception as e:  # any unreadable step is skipped: the format of the error is Orbax's
                failed.append((step, _reason(e)))
                continue
            for bad, why in failed:
                _say(f"checkpoint {self.directory / str(bad)}: unreadable ({why}); using step {step} instead")
            self._set_aside([bad for bad, _ in failed])
            return step, state
        if failed:
            step, why = failed[0]
            raise CheckpointRestoreError(f"checkpoint {self.directory / str(step)}: unreadable ({why}); no "
                                         f"older step could be read either ({len(failed)} tried)")
        return None

    def _restore(self, step: int, abstract_state: Any, data_iterator) -> Any:
        items = {STATE: ocp.args.StandardRestore(abstract_state), RECORD: ocp.args.JsonRestore()}
        if data_iterator is not None:
            items[DATA] = grain.checkpoint.CheckpointRestore(data_iterator)
        restored = self._manager.restore(step, args=ocp.args.Composite(**items))
        if restored[RECORD].get("step") != step:
            raise ValueError(f"its record names step {restored[RECORD].get('step')}")
        return restored[STATE]

    def _set_aside(self, steps: list[int]) -> None:
        if not steps:
            return
        if jax.process_index() == 0:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            for step in steps:
                path = self.directory / str(step)
                path.rename(path.with_name(f"{step}.corrupt-{stamp}"))
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices("nextstep_checkpoint_set_aside")
        self._manager.reload()

    def should_stop(self, step: int, stop: "StopSignal | None" = None) -> bool:
        """True when this process got SIGTERM or the cluster announced a preemption; agreed by every
        process, so all of them take the final save together."""
        local = bool(stop is not None and stop.requested) or self._manager.reached_preemption(int(step))
        if jax.process_count() == 1:
            return local
        from jax.experimental import multihost_utils

        return bool(np.max(multihost_utils.process_allgather(np.int32(local))))

    def wait(self) -> None:
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()


class StopSignal:
    """While active, SIGTERM (what schedulers send before preempting) only sets ``requested``; the loop checks
    it and takes a final blocking save. The previous handlers are restored on exit."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM,)):
        self._signals = signals
        self._previous: dict[int, Any] = {}
        self.requested = False

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def __enter__(self) -> StopSignal:
        for s in self._signals:
            self._previous[s] = signal.signal(s, self._handle)
        return self

    def __exit__(self, *exc_info) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
