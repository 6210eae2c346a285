"""An official release folder opened and checked against its config, strictly, before any tensor is read.

    NextStep release   config.json + model.safetensors, or model.safetensors.index.json + shards
    VAE release        config.json + checkpoint.safetensors or checkpoint.pt

Keys may carry the optional ``model.`` prefix. Every key of the mapping table must be present with its exact
shape, and every key of the files must be known (``IGNORED_TORCH_KEYS`` aside); anything else is a
``CheckpointError`` naming the key and the file.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import ml_collections

from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.mapping import IGNORED_TORCH_KEYS, Entry, nextstep_table, vae_table
from nextstep_jax.checkpoint.release.config import complete_model_config, read_release_config
from nextstep_jax.checkpoint.release.safetensors import INDEX_FILE_NAME, SINGLE_FILE_NAME, SafetensorsView
from nextstep_jax.checkpoint.release.torch_pickle import TorchPickleView

__all__ = ["OPTIONAL_PREFIX", "Release", "canonical_key", "match_tensors", "open_release", "release_kind"]

# Official files may prefix every key with "model."; accept either spelling.
OPTIONAL_PREFIX = "model."
VAE_WEIGHT_FILES = ("checkpoint.safetensors", "checkpoint.pt")


@dataclasses.dataclass
class Release:
    """An official release folder, validated: its config, mapping table and tensors."""

    folder: Path
    kind: str  # "nextstep" or "vae"
    cfg: ml_collections.ConfigDict
    table: list[Entry]
    tensors: SafetensorsView | TorchPickleView
    spelled: dict[str, str]  # canonical key -> key as spelled in the files

    def read(self, key: str):
        """The tensor of a canonical (table) key, as stored."""
        return self.tensors.read(self.spelled[key])


def _list(keys, limit: int = 5) -> str:
    keys = sorted(keys)
    more = f" (+{len(keys) - limit} more)" if len(keys) > limit else ""
    return ", ".join(repr(k) for k in keys[:limit]) + more


def canonical_key(key: str) -> str:
    """The key without the optional ``model.`` prefix (the spelling the mapping table uses)."""
    return key[len(OPTIONAL_PREFIX):] if key.startswith(OPTIONAL_PREFIX) else key


def _key_resolver(file_keys: list[str]) -> dict[str, str]:
    """Canonical key -> key as spelled in the file."""
    resolved = {}
    for key in file_keys:
        canonical = canonical_key(key)
        if canonical in resolved:
            raise CheckpointError(f"tensor {canonical!r} appears both with and without the "
                                  f"{OPTIONAL_PREFIX!r} prefix")
        resolved[canonical] = key
    return resolved


def match_tensors(table: list[Entry], source: str, file_keys: list[str],
                  shape_of: Callable[[str], tuple[int, ...]]) -> dict[str, str]:
    """Check the key set and every shape against ``table``. Returns canonical key -> key as spelled in the
    file, for the table's tensors and the ``IGNORED_TORCH_KEYS`` present."""
    spelled = _key_resolver(file_keys)
    expected = {e.torch_key: e for e in table}
    missing = expected.keys() - spelled.keys()
    if missing:
        raise CheckpointError(f"{source}: missing tensors {_list(missing)}")
    unexpected = spelled.keys() - expected.keys() - set(IGNORED_TORCH_KEYS)
    if unexpected:
        raise CheckpointError(f"{source}: unexpected tensors {_list(unexpected)} (not part of this "
                              "architecture/config)")
    for key, entry in expected.items():
        shape = tuple(shape_of(spelled[key]))
        if shape != entry.torch_shape:
            raise CheckpointError(f"{source}: tensor {key!r} has shape {shape}, config expects "
                                  f"{entry.torch_shape}")
    return spelled


def release_kind(folder: str | Path) -> str | None:
    """"nextstep" or "vae" as told by a release folder's weight files; None if it has neither."""
    folder = Path(folder)
    if (folder / SINGLE_FILE_NAME).is_file() or (folder / INDEX_FILE_NAME).is_file():
        return "nextstep"
    if any((folder / name).is_file() for name in VAE_WEIGHT_FILES):
        return "vae"
    return None


def _vae_weights(folder: Path) -> Path:
    """The tokenizer release's weight file, ``checkpoint.safetensors`` preferred over ``checkpoint.pt``."""
    weights = next((folder / n for n in VAE_WEIGHT_FILES if (folder / n).is_file()), None)
    if weights is None:
        raise CheckpointError(f"{folder}: no VAE weights (looked for {', '.join(VAE_WEIGHT_FILES)})")
    return weights


def open_release(folder: str | Path, *, kind: str | None = None, scan_layers: bool = True) -> Release:
    """Open and validate a NextStep or VAE release folder (``kind`` None: told by its files); raises
    ``CheckpointError`` naming the culprit. ``scan_layers``: the layer layout of the table (NextStep)."""
    folder = Path(folder)
    if kind not in (None, "nextstep", "vae"):
        raise ValueError(f"unknown release kind {kind!r}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    found = release_kind(folder)
    if kind is not None and found is not None and found != kind:
        raise CheckpointError(f"{folder}: holds a {found} release, expected {kind}")
    if (kind or found) == "nextstep":
        cfg = read_release_config(folder, "nextstep")
        tensors = SafetensorsView(folder, "nextstep", cfg.schema)
        cfg = complete_model_config(cfg, tensors.keys(), scan_layers=scan_layers)
        table = nextstep_table(cfg)
    else:
        cfg = read_release_config(folder, "vae")
        weights = _vae_weights(folder)
        view = SafetensorsView if weights.suffix == ".safetensors" else TorchPickleView
        tensors = view(weights, "vae")
        table = vae_table(cfg)
    try:
        spelled = match_tensors(table, str(tensors.path), tensors.keys(), tensors.shape)
    except CheckpointError:
        tensors.close()
        raise
    return Release(folder, tensors.kind, cfg, table, tensors, spelled)
