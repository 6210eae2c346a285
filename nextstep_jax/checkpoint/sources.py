"""Every checkpoint format behind one read-only view: keys as spelled, shapes and dtypes from headers, one
tensor read at a time in the release (PyTorch) layout and its stored dtype.

    NextStep release   config.json + model.safetensors, or model.safetensors.index.json + shards
    VAE release        config.json + checkpoint.safetensors or checkpoint.pt
    converted          nextstep_checkpoint.json + Orbax items (``store.StoredTensors``)
    bare tensors       any *.safetensors file, index file or folder of them, or a torch.save *.pt file

A view has ``path``, ``kind`` ("nextstep", "vae" or None for bare tensors), ``schema`` (release config schema
or None), ``format`` (one line for humans), ``keys()``, ``shape(key)``, ``dtype(key)``, ``read(key)`` and
``close()``. Release folders are validated against their config when opened (key set and every shape).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import ml_collections
import numpy as np

from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.mapping import Entry, nextstep_table, vae_table
from nextstep_jax.checkpoint.safetensors_io import DTYPES, INDEX_FILE_NAME, SINGLE_FILE_NAME, SafetensorsReader
from nextstep_jax.checkpoint.store import StoredTensors, is_checkpoint
from nextstep_jax.checkpoint.torch_pickle import load_torch_state_dict
from nextstep_jax.checkpoint.validation import complete_config, match_tensors, read_release_config, vae_weights_file
from nextstep_jax.configs import model_config_from_release, vae_config_from_release

__all__ = ["Release", "SafetensorsTensors", "TorchTensors", "open_release", "open_tensors"]


class SafetensorsTensors:
    """A safetensors file, index or release folder. Reads go through plain file reads rather than the
    reader's memory maps: mapped pages stay resident until the maps close and would add up to the whole
    release, while a read buffer is freed with its tensor."""

    def __init__(self, path: str | Path, kind: str | None = None, schema: str | None = None):
        self.path = Path(path)
        self.kind, self.schema = kind, schema
        self.reader = SafetensorsReader(self.path)
        files = self.reader.files
        self.format = ("safetensors, " + (f"{len(files)} shards + index" if self.reader.index_path else "1 file"))

    def keys(self) -> list[str]:
        return self.reader.keys()

    def shape(self, key: str) -> tuple[int, ...]:
        return self.reader.info(key).shape

    def dtype(self, key: str) -> np.dtype:
        return DTYPES[self.reader.info(key).dtype]

    def file_of(self, key: str) -> str:
        return self.reader.file_of(key).name

    def read(self, key: str) -> np.ndarray:
        return self.reader.read(key)

    def close(self) -> None:
        self.reader.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


class TorchTensors:
    """A ``torch.save`` state dict, unpickled without torch (see ``torch_pickle``); held in memory whole,
    which is fine for the one release that uses it, the ~300 MB VAE."""

    def __init__(self, path: str | Path, kind: str | None = None, schema: str | None = None):
        self.path = Path(path)
        self.kind, self.schema = kind, schema
        self.format = "torch.save state dict"
        self._state = load_torch_state_dict(self.path)

    def keys(self) -> list[str]:
        return list(self._state)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._state[key].shape)

    def dtype(self, key: str) -> np.dtype:
        return self._state[key].dtype

    def file_of(self, key: str) -> str:
        return self.path.name

    def read(self, key: str) -> np.ndarray:
        return self._state[key]

    def close(self) -> None:
        self._state = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclasses.dataclass
class Release:
    """An official release folder, validated: its config, mapping table and tensors."""

    folder: Path
    kind: str  # "nextstep" or "vae"
    cfg: ml_collections.ConfigDict
    table: list[Entry]
    tensors: SafetensorsTensors | TorchTensors
    spelled: dict[str, str]  # canonical key -> key as spelled in the files
    weight_files: tuple[Path, ...]  # every file that holds tensors (index included)


def _is_model_release(folder: Path) -> bool:
    return (folder / SINGLE_FILE_NAME).is_file() or (folder / INDEX_FILE_NAME).is_file()


def open_release(folder: str | Path, *, kind: str | None = None, scan_layers: bool = True) -> Release:
    """Open and validate a NextStep or VAE release folder (``kind`` None: told by its files); raises
    ``CheckpointError`` naming the culprit."""
    folder = Path(folder)
    if kind not in (None, "nextstep", "vae"):
        raise ValueError(f"unknown release kind {kind!r}")
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: not a folder")
    if kind == "nextstep" or (kind is None and _is_model_release(folder)):
        cfg = read_release_config(folder, model_config_from_release)
        tensors = SafetensorsTensors(folder, "nextstep", cfg.schema)
        cfg = complete_config(cfg, tensors.keys(), scan_layers=scan_layers)
        table = nextstep_table(cfg)
        files = (*tensors.reader.files, *([tensors.reader.index_path] if tensors.reader.index_path else []))
    else:
        cfg = read_release_config(folder, vae_config_from_release)
        weights = vae_weights_file(folder)
        tensors = SafetensorsTensors(weights, "vae") if weights.suffix == ".safetensors" else TorchTensors(weights, "vae")
        table = vae_table(cfg)
        files = (weights,)
    try:
        spelled = match_tensors(table, str(tensors.path), tensors.keys(), tensors.shape)
    except CheckpointError:
        tensors.close()
        raise
    return Release(folder, tensors.kind, cfg, table, tensors, spelled, files)


def open_tensors(path: str | Path):
    """A read-only tensor view of any checkpoint format (see the module docstring)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if is_checkpoint(path):
        return StoredTensors(path)
    if path.is_dir() and (path / "config.json").is_file():
        return open_release(path).tensors
    if path.suffix == ".pt":
        return TorchTensors(path)
    return SafetensorsTensors(path)
