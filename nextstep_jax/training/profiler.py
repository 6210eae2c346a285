"""A JAX profiler trace of a few training steps (``config.profile``), for TensorBoard's profile plugin or
Perfetto."""

from __future__ import annotations

from pathlib import Path

import jax

from nextstep_jax.training.distributed import say


class Profiler:
    """Traces ``num_steps`` steps from ``start_step`` (counted from 1) into ``folder``; 0 steps = off."""

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
        say(f"profile of steps {self._first}-{self._last} written to {self._folder}")

    def __exit__(self, *exc_info) -> None:
        if self._active:
            self._stop()
