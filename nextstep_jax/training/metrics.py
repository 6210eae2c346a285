"""Per-step metrics: ``metrics.jsonl`` (one JSON object per line, ``step`` first), TensorBoard scalars under
``tensorboard/`` and a progress bar with ETA. Only process 0 writes in multi-host runs.

On resume (``start_step`` = the restored step) the lines a killed run wrote after that step are dropped, so
the file reads as one run; the event file gets a restart marker that makes TensorBoard drop them too.
Non-finite values are written as ``null`` in the JSON lines (strict JSON has no NaN) and as is to TensorBoard.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from tqdm import tqdm

from nextstep_jax.io.atomic import write_file
from nextstep_jax.training.event_file import EventFileWriter

JSONL_NAME = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
_BAR_KEYS = ("loss", "lm_loss", "im_loss")


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON objects of a ``metrics.jsonl`` file, in order."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _keep_until(path: Path, step: int) -> None:
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines(keepends=True)
             if line.strip() and json.loads(line)["step"] <= step]
    write_file(path, "".join(lines).encode())


def _scalar(value) -> float:
    return float(np.asarray(value))


class MetricsWriter:
    def __init__(self, workdir: str | Path, *, total_steps: int, start_step: int = 0,
                 enabled: bool | None = None, progress: bool = True):
        self.enabled = jax.process_index() == 0 if enabled is None else enabled
        self.jsonl = Path(workdir) / JSONL_NAME
        self._events = None
        self._bar = None
        if not self.enabled:
            return
        self.jsonl.parent.mkdir(parents=True, exist_ok=True)
        _keep_until(self.jsonl, start_step)
        self._file = open(self.jsonl, "a")
        self._events = EventFileWriter(Path(workdir) / TENSORBOARD_DIR,
                                       start_step=start_step + 1 if start_step else None)
        if progress:
            self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    def write(self, step: int, metrics: Mapping[str, object]) -> None:
        """Record ``metrics`` (scalars: python numbers, numpy or jax arrays) of step ``step``."""
        if not self.enabled:
            return
        values = {k: _scalar(v) for k, v in metrics.items() if k != "step"}
        line = {"step": int(step), **{k: v if math.isfinite(v) else None for k, v in values.items()}}
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        self._events.scalars(int(step), values)
        if self._bar is not None:
            self._bar.update(int(step) - self._bar.n)
            self._bar.set_postfix({k: f"{values[k]:.4g}" for k in _BAR_KEYS if k in values}, refresh=False)

    def __enter__(self) -> MetricsWriter:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        self._file.close()
        self._events.close()
