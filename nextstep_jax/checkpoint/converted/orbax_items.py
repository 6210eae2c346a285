"""Orbax checkpoint items written and read one block at a time, and restored sharded through Orbax itself.

Orbax's ``save`` takes a whole in-memory pytree, but converting a 60 GB release must hold one tensor at a
time. ``ItemWriter`` therefore writes, block by block, exactly what Orbax's ``StandardCheckpointHandler``
writes with its defaults (OCDBT + zarr v2): one zarr array per leaf, named by the leaf's dict keys joined
with ".", in an OCDBT key-value store rooted at the item folder, plus the ``_METADATA`` tree description.
``restore_item`` reads an item back with Orbax; the tests restore what ``ItemWriter`` writes that way, so
a change of Orbax's format cannot go unnoticed.

Chunks decide what a sharded restore reads: tensorstore reads whole chunks, so when every device shard is
a union of chunks, each device reads only its own data. ``chunk_shape`` cuts each axis that the sharding
rules may split into ``MAX_SPLIT`` parts (any mesh axis of size 1, 2, 4 or 8 then falls on chunk
boundaries) and the layer axis of scanned leaves into single layers (so a layer slice is written without
reading anything back).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import orbax.checkpoint as ocp
import tensorstore as ts

from nextstep_jax.checkpoint.errors import CheckpointError

__all__ = ["BLOCK_BYTES", "MAX_SPLIT", "ItemReader", "ItemWriter", "blocks", "chunk_shape", "restore_item"]

TREE_METADATA_FILE = "_METADATA"
CHECKPOINT_METADATA_FILE = "_CHECKPOINT_METADATA"
MAX_SPLIT = 8
MAX_CHUNK_BYTES = 16 << 20
BLOCK_BYTES = 16 << 20  # one write or read; bounds the memory a conversion needs beyond one tensor
_LEAF_DATABASE_PREFIX = "ocdbt.leaf_"
_DICT_KEY = 2  # Orbax's KeyType.DICT in _METADATA
_ARRAY_VALUE_TYPES = ("jax.Array", "np.ndarray")


def chunk_shape(shape: Sequence[int], split_axes: Sequence[int], itemsize: int, *, layer_axis: bool = False,
                max_split: int = MAX_SPLIT, max_bytes: int = MAX_CHUNK_BYTES) -> tuple[int, ...]:
    """Zarr chunk shape for a leaf: ``split_axes`` cut into the largest power of two <= ``max_split``
    that divides them, axis 0 into single layers if ``layer_axis``, then the largest axis halved while a
    chunk exceeds ``max_bytes``."""
    chunk = [max(int(d), 1) for d in shape]
    if layer_axis:
        chunk[0] = 1
    for axis in split_axes:
        parts = max_split
        while chunk[axis] % parts:
            parts //= 2
        chunk[axis] //= parts
    while math.prod(chunk) * itemsize > max_bytes:
        even = [a for a in range(len(chunk)) if chunk[a] % 2 == 0]
        if not even:
            break
        axis = max(even, key=lambda a: chunk[a])
        chunk[axis] //= 2
    return tuple(chunk)


def blocks(shape: Sequence[int], chunks: Sequence[int], itemsize: int, max_bytes: int = BLOCK_BYTES
           ) -> Iterator[tuple[slice, ...]]:
    """Boxes of whole chunks tiling ``shape`` in C order, each at most ``max_bytes`` unless one chunk is
    larger. Trailing axes grow first, so a box is one contiguous run of the array where possible."""
    box = [min(c, max(s, 1)) for c, s in zip(chunks, shape)]
    for axis in reversed(range(len(shape))):
        others = math.prod(box) // box[axis] * itemsize
        fit = max(1, max_bytes // max(others * box[axis], 1))
        box[axis] = min(max(shape[axis], 1), box[axis] * fit)
        if box[axis] < shape[axis]:
            break
    for start in itertools.product(*(range(0, s, b) for s, b in zip(shape, box))):
        yield tuple(slice(a, min(a + b, s)) for a, b, s in zip(start, box, shape))


def _name(path: tuple[str, ...]) -> str:
    for key in path:
        if not key or "." in key or "/" in key:
            raise ValueError(f"{'/'.join(path)}: tree keys must be non-empty and contain no '.' or '/'")
    return ".".join(path)


def _kvstore(directory: Path) -> dict[str, Any]:
    # Orbax's OCDBT write settings: small values (zarr metadata) inline, one B-tree root, one manifest file.
    return {
        "driver": "ocdbt",
        "base": {"driver": "file", "path": f"{directory}/"},
        "config": {"max_inline_value_bytes": 1024, "max_decoded_node_bytes": 100_000_000, "manifest_kind": "single"},
        "cache_pool": "cache_pool#ocdbt",
    }


def _context() -> ts.Context:
    # B-tree nodes are cached (Orbax's 100 MB); array chunks are not, so memory stays at one block. No fsync
    # per commit: whoever publishes the item syncs it once (io.atomic.atomic_folder).
    return ts.Context({"cache_pool#ocdbt": {"total_bytes_limit": 100_000_000}, "file_io_sync": False})


class ItemWriter:
    """Writes an Orbax item into ``directory`` (created, must not exist) one block at a time.

    ``create`` declares every leaf, ``write`` fills a region of one, ``finish`` makes the item readable.
    Each leaf lives in its own OCDBT database in a sub-folder, as each process's arrays do in a multi-host
    Orbax save, and ``finish`` merges them into the item's root database the way Orbax does (references
    only, no data copied). One database per leaf matters: every write commits a new B-tree root, and in a
    single database each root would list every chunk written so far, quadratic in the size of the model.
    Data is uncompressed: trained float weights barely compress, and compressing would cost most of the time.
    """

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        self.directory.mkdir(parents=True)
        self._context = _context()
        self._arrays: dict[tuple[str, ...], ts.TensorStore] = {}
        self._pending: ts.WriteFutures | None = None

    def create(self, path: tuple[str, ...], shape: Sequence[int], dtype, chunks: Sequence[int]) -> None:
        if path in self._arrays:
            raise ValueError(f"{'/'.join(path)} is created twice")
        spec = {
            "driver": "zarr",
            "kvstore": {**_kvstore(self._leaf_database(len(self._arrays))), "path": _name(path)},
            "dtype": np.dtype(dtype).name,
            "metadata": {"shape": [int(d) for d in shape], "chunks": list(chunks), "compressor": None},
            # Orbax restores with missing chunks as errors, so chunks equal to the fill value are written too.
            "store_data_equal_to_fill_value": True,
        }
        self._arrays[path] = ts.open(spec, create=True, context=self._context).result()

    def _leaf_database(self, index: int) -> Path:
        return self.directory / f"{_LEAF_DATABASE_PREFIX}{index}"

    def write(self, path: tuple[str, ...], index: tuple, block: np.ndarray) -> None:
        """Start writing ``block`` (which must not change afterwards) once the previous write is done, so the
        caller prepares the next block while this one is written and at most two are held."""
        self.flush()
        self._pending = self._arrays[path][index].write(block, can_reference_source_data_indefinitely=True)

    def flush(self) -> None:
        if self._pending is not None:
            pending, self._pending = self._pending, None
            pending.result()

    def drain(self) -> None:
        """Wait for the write in flight whatever its outcome, so that nothing lands in the folder afterwards
        (a failed conversion deletes it)."""
        with contextlib.suppress(Exception):
            self.flush()

    def finish(self) -> None:
        self.flush()
        root = ts.KvStore.open(_kvstore(self.directory), context=self._context).result()
        merge = ts.Transaction(atomic=True)
        for i in range(len(self._arrays)):
            leaf = ts.KvStore.open(_kvstore(self._leaf_database(i)), context=self._context).result()
            leaf.experimental_copy_range_to(root.with_transaction(merge)).result()
        merge.commit_async().result()
        tree = {
            str(path): {
                "key_metadata": [{"key": key, "key_type": _DICT_KEY} for key in path],
                "value_metadata": {"value_type": "jax.Array", "skip_deserialize": False},
            }
            for path in self._arrays
        }
        metadata = {"tree_metadata": tree, "use_ocdbt": True, "use_zarr3": False,
                    "store_array_data_equal_to_fill_value": True, "custom_metadata": None}
        (self.directory / TREE_METADATA_FILE).write_text(json.dumps(metadata))
        now = time.time_ns()
        (self.directory / CHECKPOINT_METADATA_FILE).write_text(json.dumps({
            "item_handlers": "orbax.checkpoint._src.handlers.standard_checkpoint_handler.StandardCheckpointHandler",
            "metrics": {}, "performance_metrics": {}, "init_timestamp_nsecs": now, "commit_timestamp_nsecs": now,
            "custom_metadata": {},
        }))


class ItemReader:
    """Region reads of the leaves of an Orbax item (OCDBT, zarr v2 or v3), whoever wrote it."""

    def __init__(self, directory: str | Path):
        self.directory = Path(directory).absolute()
        meta_path = self.directory / TREE_METADATA_FILE
        try:
            meta = json.loads(meta_path.read_text())
            tree = meta["tree_metadata"]
            self.paths = [tuple(k["key"] for k in leaf["key_metadata"]) for leaf in tree.values()
                          if leaf["value_metadata"]["value_type"] in _ARRAY_VALUE_TYPES]
        except FileNotFoundError:
            raise CheckpointError(f"{self.directory}: not an Orbax checkpoint item (no {TREE_METADATA_FILE})") from None
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{meta_path}: unreadable Orbax tree metadata: {e!r}") from e
        if not meta.get("use_ocdbt", False):
            raise CheckpointError(f"{self.directory}: only OCDBT Orbax checkpoints are supported")
        self._driver = "zarr3" if meta.get("use_zarr3") else "zarr"
        self._context = _context()
        self._arrays: dict[tuple[str, ...], ts.TensorStore] = {}

    def array(self, path: tuple[str, ...]) -> ts.TensorStore:
        if path not in self._arrays:
            if path not in self.paths:
                raise CheckpointError(f"{self.directory}: no array {'/'.join(path)}")
            spec = {"driver": self._driver, "kvstore": {**_kvstore(self.directory), "path": _name(path)}}
            try:
                self._arrays[path] = ts.open(spec, open=True, context=self._context).result()
            except ValueError as e:
                raise CheckpointError(f"{self.directory}: array {'/'.join(path)} is unreadable: {e}") from e
        return self._arrays[path]

    def shape(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.array(path).shape)

    def dtype(self, path: tuple[str, ...]) -> np.dtype:
        return np.dtype(self.array(path).dtype.numpy_dtype)

    def chunks(self, path: tuple[str, ...]) -> tuple[int, ...]:
        return tuple(self.array(path).chunk_layout.read_chunk.shape)

    def read(self, path: tuple[str, ...], index: tuple = ()) -> np.ndarray:
        return self._result(self.array(path)[index].read(), path, index)

    def read_blocks(self, path: tuple[str, ...], boxes: Iterable[tuple], prefix: tuple = ()
                    ) -> Iterator[tuple[tuple, np.ndarray]]:
        """(box, data at ``prefix + box``) for each box, the next read in flight while the caller uses this one."""
        array = self.array(path)
        pending = None
        for box in boxes:
            future = array[prefix + box].read()
            if pending is not None:
                yield pending[0], self._result(pending[1], path, prefix + pending[0])
            pending = (box, future)
        if pending is not None:
            yield pending[0], self._result(pending[1], path, prefix + pending[0])

    def _result(self, future, path: tuple[str, ...], index: tuple) -> np.ndarray:
        try:
            return future.result()
        except ValueError as e:  # e.g. a chunk missing from an interrupted write
            region = ", ".join(f"{s.start}:{s.stop}" if isinstance(s, slice) else str(s) for s in index)
            raise CheckpointError(f"{self.directory}: reading {'/'.join(path)}[{region}] failed: {e}") from e


def restore_item(directory: str | Path, target: Any) -> Any:
    """Orbax restore of an item into ``target``: a pytree of ``jax.ShapeDtypeStruct`` with shardings. Each
    device reads only the chunks of its own shard; dtypes differing from the stored ones are cast."""
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(Path(directory).absolute(), target)
