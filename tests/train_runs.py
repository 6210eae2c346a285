"""Runs of ``python -m nextstep_jax.train`` for the trainer tests: the tiny config at test sizes, in a subprocess
(fake CPU devices exist only if XLA hears of them before JAX starts).

Every run uses the test session's persistent compilation cache (tests/conftest.py), for every program however
quick to compile, so a program compiled by one run (the restarted run of a resume test, the same model on the same
mesh) is not compiled again: the cached executable is the same program, so results stay bit for bit those of a
fresh compile.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Test sizes: 96-token rows of 32 px shapes (4 image tokens each), 8 rows (so 8 devices each get one).
SMALL = ("--config.data.seq_len=96", "--config.data.batch_size=8", "--config.data.image_size=32",
         "--config.data.max_images_per_row=2", "--config.eval.every_steps=0", "--config.sampling.num_steps=4")


def environment(devices: int = 1, **extra: str) -> dict[str, str]:
    """The environment of a program a test starts on ``devices`` fake CPU devices: the session's XLA flags
    (tests/conftest.py) and compilation cache, the repository importable."""
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    if devices > 1:
        flags.append(f"--xla_force_host_platform_device_count={devices}")
    env["XLA_FLAGS"] = " ".join(flags)
    env.update(JAX_PLATFORMS="cpu", JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    env.update(extra)
    return env


def command(workdir: Path, *overrides: str, config: str = "configs/tiny.py") -> list[str]:
    return [sys.executable, "-m", "nextstep_jax.train", f"--config={REPO / config}", "--workdir", str(workdir),
            "--no-progress", *SMALL, *overrides]


def run_train(workdir: Path, *overrides: str, devices: int = 1, expect: int = 0, timeout: int = 600
              ) -> subprocess.CompletedProcess:
    """One run to completion; fails the test with its output unless it exits with ``expect``."""
    proc = subprocess.run(command(workdir, *overrides), cwd=REPO, env=environment(devices), capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == expect, f"exit {proc.returncode} (expected {expect})\n{proc.stdout}\n{proc.stderr}"
    return proc


_SHARED: dict[tuple[str, ...], Path] = {}
REFERENCE = ("--config.total_steps=60", "--config.checkpoint.every_steps=1000")  # the shared uninterrupted run


def shared_run(*overrides: str) -> Path:
    """The workdir of one completed single-device run with these overrides, made once per test session for all
    the tests that only read its metrics (a long enough run serves as the uninterrupted reference of a shorter
    one: nothing in a step depends on total_steps under the tiny config's warmup-then-constant schedule)."""
    if overrides not in _SHARED:
        workdir = Path(tempfile.mkdtemp(prefix="nextstep_train_run_"))
        atexit.register(shutil.rmtree, workdir, True)
        run_train(workdir, *overrides)
        _SHARED[overrides] = workdir
    return _SHARED[overrides]


def read_metrics(workdir: Path) -> dict[int, dict]:
    """step -> that step's metrics line of ``workdir/metrics.jsonl``."""
    lines = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    by_step = {line["step"]: line for line in lines}
    assert len(by_step) == len(lines), "a step was written twice"
    return by_step


def checkpoint_steps(workdir: Path) -> list[int]:
    folder = workdir / "checkpoints"
    return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit()) if folder.is_dir() else []
