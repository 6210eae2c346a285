"""The layout of a training workdir, and the resolved config every run writes into it.

``config.json`` (the resolved config), ``checkpoints/``, ``metrics.jsonl`` and ``tensorboard/``
(``training/metrics.py``), ``samples/`` or ``eval/`` (the task's periodic output) and ``profile/``.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import ml_collections

from nextstep_jax.io.atomic import write_file
from nextstep_jax.training.distributed import say

WORKDIR_CONFIG = "config.json"
CHECKPOINTS_DIR, SAMPLES_DIR, PROFILE_DIR = "checkpoints", "samples", "profile"


def has_checkpoints(workdir: Path) -> bool:
    """Whether the workdir holds step folders to resume from (complete or not)."""
    folder = workdir / CHECKPOINTS_DIR
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


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
            say(f"{path}: this run changes {', '.join(changed)}")
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
