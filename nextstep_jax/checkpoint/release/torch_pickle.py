"""Read a ``torch.save`` state dict into numpy arrays without importing (or executing) torch.

A ``torch.save`` file (torch >= 1.6) is a zip archive ``<prefix>/data.pkl`` + ``<prefix>/data/<key>``
(one raw little-endian record per storage) + ``<prefix>/byteorder``. ``data.pkl`` is a pickle whose
tensors are ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)`` calls, with each
storage a persistent id ``('storage', torch.<X>Storage, key, location, numel)``.

Unpickling is restricted: ``find_class`` admits only the handful of globals a state dict needs, each
mapped to a stand-in defined here; any other global (``os.system``, ``builtins.eval``, ...) raises
``CheckpointError`` as soon as the pickle names it, so it is never called.
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from nextstep_jax.checkpoint.dtypes import TORCH_STORAGE_DTYPES
from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.tensor_view import TensorView

__all__ = ["WRAPPER_KEYS", "TorchPickleView", "load_torch_state_dict"]

# Keys under which training scripts commonly wrap a state dict; used only when exactly one matches.
WRAPPER_KEYS = ("state_dict", "model")


class _StorageType(NamedTuple):
    """Stand-in for a ``torch.<X>Storage`` class; a tuple so a crafted pickle cannot mutate it."""

    name: str
    dtype: np.dtype


_STORAGE_TYPES = {name: _StorageType(name, dtype) for name, dtype in TORCH_STORAGE_DTYPES.items()}


class _Storage(NamedTuple):
    source: str  # "<file>:<record>", for error messages
    elements: np.ndarray  # 1-D, typed view of the record's bytes


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor(storage: _Storage, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> np.ndarray:
    if not isinstance(storage, _Storage):
        raise TypeError(f"tensor rebuilt from {type(storage).__name__}, not from a storage")
    layout = f"size {size}, stride {stride}, offset {offset}"
    if not (_is_int(offset) and offset >= 0 and isinstance(size, tuple) and isinstance(stride, tuple)
            and len(size) == len(stride) and all(_is_int(v) and v >= 0 for v in size + stride)):
        raise CheckpointError(f"{storage.source}: invalid tensor layout ({layout})")
    data = storage.elements
    if 0 in size:
        return np.empty(size, data.dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if last >= data.size:
        raise CheckpointError(
            f"{storage.source}: tensor ({layout}) reads element {last} of a {data.size}-element storage")
    view = np.lib.stride_tricks.as_strided(
        data[offset:], shape=size, strides=tuple(s * data.itemsize for s in stride))
    # Contiguous tensors stay zero-copy views of the storage; anything else (transposed, expanded) is
    # compacted so callers always get plain C-ordered arrays.
    return view if view.flags.c_contiguous else view.copy()


def _rebuild_tensor(storage, storage_offset, size, stride):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None):
    return _tensor(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad, backward_hooks):
    if not isinstance(data, np.ndarray):
        raise TypeError(f"parameter rebuilt from {type(data).__name__}, not from a tensor")
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "dict"): dict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    **{("torch", name): storage_type for name, storage_type in _STORAGE_TYPES.items()},
}


class _Archive:
    """The zip side of a checkpoint: locates ``data.pkl`` and serves storage records."""

    def __init__(self, path: Path, zf: zipfile.ZipFile):
        self.path = path
        self.zf = zf
        self.prefix = self._find_prefix()
        self._records: dict[str, np.ndarray] = {}
        byteorder_record = f"{self.prefix}/byteorder"
        # Older torch versions wrote no byteorder record and torch then assumes native (in practice little) order.
        byteorder = self.read(byteorder_record) if byteorder_record in zf.namelist() else b"little"
        if byteorder != b"little":
            raise CheckpointError(f"{path}: unsupported storage byte order {byteorder!r} (only 'little')")

    def _find_prefix(self) -> str:
        pickles = [name for name in self.zf.namelist() if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise CheckpointError(f"{self.path}: expected one '<prefix>/data.pkl' in the zip, found {pickles}")
        return pickles[0].split("/")[0]

    def read(self, name: str) -> bytes:
        try:
            return self.zf.read(name)
        except KeyError:
            raise CheckpointError(f"{self.path}: record {name!r} is missing from the zip") from None
        except (zipfile.BadZipFile, OSError, EOFError) as e:
            raise CheckpointError(f"{self.path}: record {name!r} is corrupt: {e}") from e

    def _record(self, key: str) -> np.ndarray:
        if key not in self._records:
            # bytearray: the arrays handed out must be writable.
            self._records[key] = np.frombuffer(bytearray(self.read(f"{self.prefix}/data/{key}")), np.uint8)
        return self._records[key]

    def storage(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str) and _is_int(pid[4])):
            raise CheckpointError(f"{self.path}: unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        source = f"{self.path}:{self.prefix}/data/{key}"
        raw = self._record(key)
        if raw.size != numel * storage_type.dtype.itemsize:
            raise CheckpointError(
                f"{source}: record has {raw.size} bytes, but a {storage_type.name} of {numel} elements "
                f"needs {numel * storage_type.dtype.itemsize}")
        return _Storage(source, raw.view(storage_type.dtype))


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, archive: _Archive):
        super().__init__(file)
        self._archive = archive

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise CheckpointError(
                f"{self._archive.path}: refusing to load global {module}.{name} (not part of a plain tensor "
                f"state dict; the file may be malicious)") from None

    def persistent_load(self, pid: Any) -> _Storage:
        return self._archive.storage(pid)


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def _unwrap_state_dict(path: Path, obj: Any) -> dict[str, np.ndarray]:
    if _is_state_dict(obj):
        return dict(obj)
    if isinstance(obj, dict):
        wrapped = [k for k in WRAPPER_KEYS if _is_state_dict(obj.get(k))]
        if len(wrapped) == 1:
            return dict(obj[wrapped[0]])
        culprit = next((k for k, v in obj.items() if not isinstance(v, np.ndarray)), None)
        raise CheckpointError(
            f"{path}: not a flat {{name: tensor}} state dict (entry {culprit!r} is "
            f"{type(obj.get(culprit)).__name__}), and not unambiguously wrapped under one of {WRAPPER_KEYS} "
            f"(top-level keys: {list(obj)[:20]})")
    raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict")


def _unsupported_format(path: Path) -> CheckpointError:
    with open(path, "rb") as f:
        head = f.read(4)
    if head[:1] == b"\x80":
        return CheckpointError(
            f"{path}: unsupported legacy (pre-zip, torch < 1.6 or _use_new_zipfile_serialization=False) torch.save "
            f"format; re-save it with a current torch.save")
    if head.startswith(b"PK"):
        return CheckpointError(f"{path}: corrupt or truncated zip archive")
    return CheckpointError(f"{path}: not a torch.save checkpoint (no zip archive)")


def load_torch_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The tensors of a ``torch.save``'d state dict, as numpy arrays with the stored dtypes and bytes.

    Accepts a flat ``{name: tensor}`` dict (plain or OrderedDict, tensors or Parameters), or such a dict
    wrapped under exactly one of ``WRAPPER_KEYS`` inside an outer dict whose other entries unpickle safely.
    Contiguous tensors are views of the storage they were saved with (tensors saved sharing one storage
    keep sharing it, as in torch); other layouts are returned as C-contiguous copies.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    if not zipfile.is_zipfile(path):
        raise _unsupported_format(path)
    try:
        with zipfile.ZipFile(path) as zf:
            archive = _Archive(path, zf)
            obj = _load_pickle(archive)
    except zipfile.BadZipFile as e:
        raise CheckpointError(f"{path}: corrupt zip archive: {e}") from e
    return _unwrap_state_dict(path, obj)


def _load_pickle(archive: _Archive) -> Any:
    name = f"{archive.prefix}/data.pkl"
    try:
        return _RestrictedUnpickler(io.BytesIO(archive.read(name)), archive).load()
    except CheckpointError:
        raise
    except Exception as e:  # whatever else a crafted or damaged pickle trips over is a bad file, not a bug here
        raise CheckpointError(f"{archive.path}: {name} is not a valid state-dict pickle: {e!r}") from e


class TorchPickleView(TensorView):
    """A ``torch.save`` state dict as a ``TensorView``, held in memory whole, which is fine for the one
    release that uses the format, the ~300 MB VAE."""

    def __init__(self, path: str | Path, kind: str | None = None, schema: str | None = None):
        self.path = Path(path)
        self.kind, self.schema = kind, schema
        self.format = "torch.save state dict"
        self.weight_files = (self.path,)
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
