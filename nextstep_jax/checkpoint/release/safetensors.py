"""Validating, streaming reader and writer for safetensors files and Hugging Face sharded folders.

File format: an 8-byte little-endian header length N, N bytes of UTF-8 JSON
``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}`` (space padded),
then the data section; offsets are relative to its start and must tile it without gaps or overlaps.

A release is one of: a folder with ``model.safetensors``; a folder with ``model.safetensors.index.json``
(``{"metadata": {...}, "weight_map": {key: shard file name}}``) and its shards; or a path to any single
``*.safetensors`` file or to an index file. Everything is validated from the headers before any tensor is
read; files are never loaded whole, and each read touches only its tensor's bytes.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, NamedTuple

import numpy as np

from nextstep_jax.checkpoint.dtypes import DTYPE_NAMES, DTYPES
from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.tensor_view import TensorView
from nextstep_jax.io.atomic import atomic_file

__all__ = [
    "INDEX_FILE_NAME", "SINGLE_FILE_NAME", "SafetensorsReader", "SafetensorsView", "TensorInfo", "TensorSpec",
    "write_safetensors", "write_sharded",
]

SINGLE_FILE_NAME = "model.safetensors"
INDEX_FILE_NAME = "model.safetensors.index.json"
_SHARD_NAME_RE = re.compile(r"^model-\d{5}-of-\d{5}\.safetensors$")

# Tensors are laid out as the library does: by descending dtype rank (``DTYPES`` order), then by name.
_DTYPE_RANK: dict[str, int] = {name: rank for rank, name in enumerate(DTYPES)}
_HEADER_LEN = struct.Struct("<Q")


class TensorInfo(NamedTuple):
    shape: tuple[int, ...]
    dtype: str  # safetensors name, e.g. "F32"; DTYPES[dtype] is the numpy dtype


@dataclass(frozen=True)
class _Entry:
    file: Path
    shape: tuple[int, ...]
    dtype: str
    start: int  # absolute file offsets
    stop: int


@dataclass(frozen=True)
class _FileHeader:
    path: Path
    size: int
    entries: dict[str, _Entry]
    metadata: dict[str, str]


# ----------------------------------------------------------------------------------------------- reading


def _reject_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _strict_json(raw: bytes | str) -> Any:
    return json.loads(raw, object_pairs_hook=_reject_duplicates)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _parse_entry(path: Path, key: str, value: Any, data_start: int) -> _Entry:
    where = f"{path}: tensor {key!r}"
    if not isinstance(value, dict) or not {"dtype", "shape", "data_offsets"} <= value.keys():
        raise CheckpointError(f"{where}: header entry must have dtype, shape and data_offsets, got {value!r}")
    dtype, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if dtype not in DTYPES:
        raise CheckpointError(f"{where}: unsupported dtype {dtype!r} (supported: {', '.join(DTYPES)})")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise CheckpointError(f"{where}: invalid shape {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where}: invalid data_offsets {offsets!r}")
    nbytes = math.prod(shape) * DTYPES[dtype].itemsize
    if offsets[1] - offsets[0] != nbytes:
        raise CheckpointError(
            f"{where}: shape {tuple(shape)} {dtype} needs {nbytes} bytes but data_offsets {offsets} "
            f"span {offsets[1] - offsets[0]}")
    return _Entry(path, tuple(shape), dtype, data_start + offsets[0], data_start + offsets[1])


def _parse_metadata(path: Path, metadata: Any) -> dict[str, str]:
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings, got {metadata!r}")
    return metadata


def _check_layout(path: Path, entries: dict[str, _Entry], data_start: int, size: int) -> None:
    for key, entry in entries.items():
        if entry.stop > size:
            raise CheckpointError(
                f"{path}: tensor {key!r} ends at byte {entry.stop} but the file has only {size} bytes "
                f"(truncated?)")
    expected = data_start
    for key, entry in sorted(entries.items(), key=lambda kv: (kv[1].start, kv[1].stop)):
        if entry.start != expected:
            raise CheckpointError(
                f"{path}: tensor {key!r} data starts at offset {entry.start - data_start}, expected "
                f"{expected - data_start} (tensor data overlaps or leaves a gap)")
        expected = entry.stop
    if expected != size:
        raise CheckpointError(f"{path}: {size - expected} unindexed bytes after the last tensor")


def _read_header(path: str | os.PathLike) -> _FileHeader:
    """Parse and validate one safetensors header (no tensor data is read)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(_HEADER_LEN.size)
        if len(prefix) < _HEADER_LEN.size:
            raise CheckpointError(f"{path}: only {size} bytes, too short for a safetensors header (truncated?)")
        (header_len,) = _HEADER_LEN.unpack(prefix)
        if header_len > size - _HEADER_LEN.size:
            raise CheckpointError(
                f"{path}: header length {header_len} runs past the end of the {size}-byte file "
                f"(truncated, or not a safetensors file)")
        raw = f.read(header_len)
    try:
        header = _strict_json(raw.decode("utf-8"))
    except ValueError as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise CheckpointError(f"{path}: safetensors header is not valid JSON: {e}") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header must be a JSON object, got {type(header).__name__}")
    metadata = _parse_metadata(path, header.pop("__metadata__", {}))
    data_start = _HEADER_LEN.size + header_len
    entries = {key: _parse_entry(path, key, value, data_start) for key, value in header.items()}
    _check_layout(path, entries, data_start, size)
    return _FileHeader(path, size, entries, metadata)


def _read_index(index_path: Path) -> tuple[dict[str, str], dict[str, Any]]:
    try:
        doc = _strict_json(index_path.read_bytes())
    except ValueError as e:
        raise CheckpointError(f"{index_path}: index is not valid JSON: {e}") from e
    weight_map = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index_path}: index has no 'weight_map' object")
    for key, shard in weight_map.items():
        # Shard names are plain file names next to the index; anything else could escape the folder.
        if not isinstance(shard, str) or shard in ("", ".", "..") or Path(shard).name != shard or "\\" in shard:
            raise CheckpointError(f"{index_path}: key {key!r} maps to invalid shard name {shard!r}")
    metadata = doc.get("metadata", {})
    if not isinstance(metadata, dict):
        raise CheckpointError(f"{index_path}: 'metadata' must be an object, got {metadata!r}")
    return weight_map, metadata


def _merge_shards(index_path: Path, weight_map: dict[str, str], headers: list[_FileHeader]) -> dict[str, _Entry]:
    merged: dict[str, _Entry] = {}
    for header in headers:
        for key, entry in header.entries.items():
            if key in merged:
                raise CheckpointError(f"tensor {key!r} is stored in both {merged[key].file} and {header.path}")
            listed = weight_map.get(key)
            if listed != header.path.name:
                where = "does not list it" if listed is None else f"maps it to {listed}"
                raise CheckpointError(f"{header.path}: holds tensor {key!r} but {index_path} {where}")
            merged[key] = entry
    for key, shard in weight_map.items():
        if key not in merged:
            raise CheckpointError(f"{index_path}: maps tensor {key!r} to {shard}, which does not contain it")
    return merged


def _locate(path: Path) -> Path:
    """The single safetensors file or the index file that ``path`` designates."""
    if path.is_dir():
        single, index = path / SINGLE_FILE_NAME, path / INDEX_FILE_NAME
        if single.is_file() and index.is_file():
            raise CheckpointError(f"{path}: has both {SINGLE_FILE_NAME} and {INDEX_FILE_NAME}; pass one explicitly")
        if not single.is_file() and not index.is_file():
            found = sorted(p.name for p in path.glob("*.safetensors"))
            raise CheckpointError(f"{path}: no {SINGLE_FILE_NAME} or {INDEX_FILE_NAME} (safetensors files: {found})")
        path = single if single.is_file() else index
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file or directory")
    return path


def _shard_files(index_path: Path, weight_map: dict[str, str]) -> list[Path]:
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (index_path.parent / name).is_file()]
    if missing:
        raise CheckpointError(
            f"{index_path}: shard file(s) {missing} listed in the index are missing from {index_path.parent}")
    return [index_path.parent / name for name in shards]


class SafetensorsReader:
    """Random access to the tensors of a safetensors file or sharded release, one tensor at a time.

    ``path``: a folder (``model.safetensors`` or ``model.safetensors.index.json`` inside), an index file,
    or any single ``.safetensors`` file. All headers (and the index) are validated on construction.
    Use as a context manager, or call ``close()``, to close the open files.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        target = _locate(self.path)
        self.index_path: Path | None = None
        self.index_metadata: dict[str, Any] | None = None
        if target.suffix == ".json":
            self.index_path = target
            weight_map, self.index_metadata = _read_index(target)
            headers = [_read_header(f) for f in _shard_files(target, weight_map)]
            self._entries = _merge_shards(target, weight_map, headers)
        else:
            headers = [_read_header(target)]
            self._entries = headers[0].entries
        self._headers = {h.path: h for h in headers}
        self._files: dict[Path, BinaryIO] = {}

    @property
    def files(self) -> tuple[Path, ...]:
        return tuple(self._headers)

    @property
    def metadata(self) -> dict[str, str]:
        """The ``__metadata__`` items shared by every file (for a single file: all of its metadata)."""
        first, *rest = (h.metadata for h in self._headers.values())
        return {k: v for k, v in first.items() if all(m.get(k) == v for m in rest)}

    def keys(self) -> list[str]:
        return list(self._entries)

    def __contains__(self, key: object) -> bool:
        return key in self._entries

    def __len__(self) -> int:
        return len(self._entries)

    def _entry(self, key: str) -> _Entry:
        try:
            return self._entries[key]
        except KeyError:
            raise CheckpointError(f"{self.path}: no tensor {key!r}") from None

    def info(self, key: str) -> TensorInfo:
        entry = self._entry(key)
        return TensorInfo(entry.shape, entry.dtype)

    def file_of(self, key: str) -> Path:
        return self._entry(key).file

    def _file(self, path: Path) -> BinaryIO:
        if path not in self._files:
            f = open(path, "rb")
            if os.fstat(f.fileno()).st_size != self._headers[path].size:
                f.close()
                raise CheckpointError(f"{path}: changed size on disk since its header was read")
            self._files[path] = f
        return self._files[path]

    def read(self, key: str) -> np.ndarray:
        """A fresh, writable, C-contiguous copy of one tensor, byte-exact from the file. A plain read, not a
        memory map: mapped pages would stay resident, so reading a whole release would grow RSS to its size."""
        entry = self._entry(key)
        out = np.empty(entry.shape, DTYPES[entry.dtype])
        raw = out.reshape(-1).view(np.uint8)
        f = self._file(entry.file)
        f.seek(entry.start)
        if f.readinto(raw) != raw.size:
            raise CheckpointError(f"{entry.file}: tensor {key!r} is cut short (file changed while reading?)")
        return out

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class SafetensorsView(TensorView):
    """A safetensors file, index or release folder as a ``TensorView``. Reads go through plain file reads
    rather than memory maps: mapped pages stay resident until the maps close and would add up to the whole
    release, while a read buffer is freed with its tensor."""

    def __init__(self, path: str | Path, kind: str | None = None, schema: str | None = None):
        self.path = Path(path)
        self.kind, self.schema = kind, schema
        self.reader = SafetensorsReader(self.path)
        files = self.reader.files
        self.format = "safetensors, " + (f"{len(files)} shards + index" if self.reader.index_path else "1 file")

    @property
    def weight_files(self) -> tuple[Path, ...]:
        """Every file that holds tensors, the index included."""
        return (*self.reader.files, *([self.reader.index_path] if self.reader.index_path else []))

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


# ----------------------------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class TensorSpec:
    """A tensor to write: declared up front so the header can be written before any data is produced.

    ``produce()`` is called exactly once, while writing, and must return an array (numpy, jax, ...) of
    exactly ``shape`` and ``dtype``; nothing is cast, so what is written is bit-for-bit what it returns.
    """

    key: str
    shape: tuple[int, ...]
    dtype: np.dtype
    produce: Callable[[], Any]

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", np.dtype(self.dtype))
        if not isinstance(self.key, str) or not self.key or self.key == "__metadata__":
            raise CheckpointError(f"invalid tensor key {self.key!r}")
        if self.dtype not in DTYPE_NAMES:
            raise CheckpointError(f"tensor {self.key!r}: dtype {self.dtype} cannot be stored in safetensors "
                                  f"(supported: {', '.join(DTYPES)})")
        if any(d < 0 for d in self.shape):
            raise CheckpointError(f"tensor {self.key!r}: invalid shape {self.shape}")

    @classmethod
    def of(cls, key: str, array: Any) -> TensorSpec:
        """Spec for an array that is already in memory."""
        array = np.asarray(array)
        return cls(key, array.shape, array.dtype, lambda: array)

    @property
    def dtype_name(self) -> str:
        return DTYPE_NAMES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def _unique_specs(tensors: Iterable[TensorSpec]) -> list[TensorSpec]:
    specs = list(tensors)
    seen: set[str] = set()
    for spec in specs:
        if spec.key in seen:
            raise CheckpointError(f"tensor {spec.key!r} is given twice")
        seen.add(spec.key)
    return specs


def _encode_header(specs: list[TensorSpec], metadata: Mapping[str, str] | None) -> bytes:
    header: dict[str, Any] = {}
    if metadata is not None:
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()):
            raise CheckpointError(f"safetensors metadata must map strings to strings, got {dict(metadata)!r}")
        header["__metadata__"] = dict(sorted(metadata.items()))
    offset = 0
    for spec in specs:
        header[spec.key] = {"dtype": spec.dtype_name, "shape": list(spec.shape),
                            "data_offsets": [offset, offset + spec.nbytes]}
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # the library pads the header to a multiple of 8 bytes
    return _HEADER_LEN.pack(len(raw)) + raw


def _write_tensor(f: IO[bytes], path: Path, spec: TensorSpec) -> None:
    array = np.asarray(spec.produce())
    if array.shape != spec.shape or array.dtype != spec.dtype:
        raise CheckpointError(
            f"{path}: tensor {spec.key!r} was declared {spec.shape} {spec.dtype} but its producer returned "
            f"{array.shape} {array.dtype}")
    f.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)


def write_safetensors(path: str | os.PathLike, tensors: Iterable[TensorSpec],
                      metadata: Mapping[str, str] | None = None) -> Path:
    """Stream ``tensors`` into one safetensors file; peak memory is about one produced tensor.

    The layout (tensor order, header JSON and padding) follows the safetensors library, so writing the
    tensors of a library-written file reproduces it byte for byte (metadata keys are written sorted).
    """
    path = Path(path)
    specs = sorted(_unique_specs(tensors), key=lambda s: (-_DTYPE_RANK[s.dtype_name], s.key))
    header = _encode_header(specs, metadata)
    with atomic_file(path) as f:
        f.write(header)
        for spec in specs:
            _write_tensor(f, path, spec)
    return path


def _shard_file_name(index: int, count: int) -> str:
    return f"model-{index:05d}-of-{count:05d}.safetensors"


def _plan_shards(specs: list[TensorSpec], max_shard_size_bytes: int) -> list[list[TensorSpec]]:
    """Greedy, order-preserving packing, as transformers does; an oversized tensor gets a shard of its own."""
    if not _is_int(max_shard_size_bytes) or max_shard_size_bytes <= 0:
        raise ValueError(f"max_shard_size_bytes must be a positive int, got {max_shard_size_bytes!r}")
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_size_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def _is_release_weight_file(name: str) -> bool:
    return name in (SINGLE_FILE_NAME, INDEX_FILE_NAME) or bool(_SHARD_NAME_RE.match(name))


def write_sharded(out_dir: str | os.PathLike, tensors: Iterable[TensorSpec], max_shard_size_bytes: int,
                  metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Write a release folder: ``model.safetensors`` if everything fits in one shard, else
    ``model-0000i-of-0000N.safetensors`` + ``model.safetensors.index.json`` (the transformers layout).

    Each file is written atomically. Any old index is deleted first and the new one written last, so an
    interrupted export never leaves an index pointing at a mix of old and new shards; weight files of a
    previous export that were not rewritten are removed at the end. Returns the files written.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = _plan_shards(_unique_specs(tensors), max_shard_size_bytes)
    (out_dir / INDEX_FILE_NAME).unlink(missing_ok=True)
    if len(shards) == 1:
        written = [write_safetensors(out_dir / SINGLE_FILE_NAME, shards[0], metadata)]
    else:
        names = [_shard_file_name(i + 1, len(shards)) for i in range(len(shards))]
        written = [write_safetensors(out_dir / name, shard, metadata) for name, shard in zip(names, shards)]
        index = {
            "metadata": {"total_size": sum(spec.nbytes for shard in shards for spec in shard)},
            "weight_map": {spec.key: name for name, shard in zip(names, shards) for spec in shard},
        }
        with atomic_file(out_dir / INDEX_FILE_NAME) as f:
            f.write(json.dumps(index, indent=2, sort_keys=True).encode("utf-8"))
        written.append(out_dir / INDEX_FILE_NAME)
    for stale in list(out_dir.iterdir()):
        if _is_release_weight_file(stale.name) and stale not in written:
            stale.unlink()
    return written
