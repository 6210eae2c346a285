"""Our converted checkpoint: Flax params as an Orbax item, plus everything export needs to rebuild the release.

    CHECKPOINT/
      nextstep_checkpoint.json  manifest: kind, our config, and every release tensor in release order (key as
                                spelled, torch shape, source dtype, stored dtype, release file); written last
      params/                   Orbax item (OCDBT + zarr): the Flax params tree, scanned or per layer
      extra/                    Orbax item: release tensors that are not parameters (``gen_pos_embed``), kept
                                in the release layout and dtype so they go back byte for byte
      release/                  the release's other files, verbatim: config.json, tokenizer files, code

``StoreWriter`` and ``ConvertedView`` move one tensor at a time between the release layout and the Orbax
items, block by block (``mapping.flax_view``), so a conversion never holds more than one tensor.
``restore_params`` reads the params in their stored layout straight into the shardings of a mesh, never
holding the model on one host (``checkpoint.load_model`` is the call that also changes their layout).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import linen as nn
from flax import traverse_util
from jax.sharding import Mesh, SingleDeviceSharding

from nextstep_jax.checkpoint.converted.orbax_items import ItemReader, ItemWriter, blocks, chunk_shape, restore_item
from nextstep_jax.checkpoint.converted.tiled_copy import tiled_copy
from nextstep_jax.checkpoint.dtypes import DTYPES
from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.mapping import Entry, flax_view, table_for
from nextstep_jax.checkpoint.release.folder import canonical_key
from nextstep_jax.checkpoint.tensor_view import TensorView
from nextstep_jax.configs import model_config, vae_config
from nextstep_jax.models.nextstep import abstract_variables
from nextstep_jax.models.vae import AutoencoderKL, downsample_factor
from nextstep_jax.sharding import LOGICAL_AXIS_RULES, shardings_of

__all__ = ["KINDS", "ConvertedView", "Manifest", "StoreWriter", "TensorRecord", "abstract_params", "is_checkpoint",
           "read_manifest", "restore_params"]

FORMAT = "nextstep_jax.checkpoint/1"
MANIFEST_FILE = "nextstep_checkpoint.json"
PARAMS_ITEM = "params"
EXTRA_ITEM = "extra"
RELEASE_DIR = "release"
# A model release keeps its image tokenizer in vae/; a converted model keeps that VAE, converted, under the
# same name, so ``<model>/vae`` names the model's VAE in both.
VAE_DIR = "vae"
KINDS = ("nextstep", "vae")


# ------------------------------------------------------------------------------------------------ manifest


@dataclasses.dataclass(frozen=True)
class TensorRecord:
    key: str  # as spelled in the release
    shape: tuple[int, ...]  # release (PyTorch) layout
    source_dtype: str  # safetensors dtype name in the release
    stored_dtype: str  # in the Orbax item
    file: str  # release file that held it
    extra: bool = False  # not a parameter: stored under extra/ in the release layout

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * DTYPES[self.stored_dtype].itemsize


@dataclasses.dataclass(frozen=True)
class Manifest:
    kind: str  # one of KINDS
    config: dict[str, Any]  # our ConfigDict, as plain JSON
    tensors: tuple[TensorRecord, ...]
    metadata: dict[str, str]  # the release files' safetensors __metadata__
    index_metadata: dict[str, Any] | None  # the "metadata" of the release's index (sharded releases)

    def model_config(self) -> ml_collections.ConfigDict:
        base = model_config() if self.kind == "nextstep" else vae_config()
        fields = {k: tuple(v) if isinstance(base.get(k), tuple) else v for k, v in self.config.items()}
        base.update(fields)
        return base

    def table(self, cfg: ml_collections.ConfigDict | None = None) -> list[Entry]:
        cfg = cfg or self.model_config()
        return table_for(self.kind, cfg)


def write_manifest(directory: Path, manifest: Manifest) -> None:
    doc = {"format": FORMAT, **dataclasses.asdict(manifest)}
    (directory / MANIFEST_FILE).write_text(json.dumps(doc, indent=1))


def is_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MANIFEST_FILE).is_file()


def read_manifest(path: str | Path) -> Manifest:
    manifest_path = Path(path) / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"{path}: not a converted checkpoint (no {MANIFEST_FILE})")
    try:
        doc = json.loads(manifest_path.read_text())
        if doc.pop("format") != FORMAT:
            raise ValueError(f"unknown format, expected {FORMAT!r}")
        doc["tensors"] = tuple(TensorRecord(**{**t, "shape": tuple(t["shape"])}) for t in doc["tensors"])
        manifest = Manifest(**doc)
    except (ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{manifest_path}: unreadable manifest: {e}") from e
    if manifest.kind not in KINDS:
        raise CheckpointError(f"{manifest_path}: unknown kind {manifest.kind!r}")
    return manifest


# ------------------------------------------------------------------------------------------ layout helpers


def _extra_entry(record: TensorRecord) -> Entry:
    return Entry(record.key, (canonical_key(record.key),), "copy", record.shape, record.shape)


def abstract_params(kind: str, cfg: ml_collections.ConfigDict) -> dict:
    """Boxed abstract params (shapes, dtypes, logical axis names) of the model a checkpoint belongs to."""
    if kind == "nextstep":
        return abstract_variables(cfg)["params"]
    side = downsample_factor(cfg) * cfg.psz
    image = jax.ShapeDtypeStruct((1, side, side, cfg.in_channels), jnp.float32)
    return jax.eval_shape(lambda x: AutoencoderKL(cfg).init(jax.random.key(0), x), image)["params"]


def _leaves(boxed: dict) -> dict[tuple[str, ...], Any]:
    return traverse_util.flatten_dict(boxed, is_leaf=lambda _, v: isinstance(v, nn.Partitioned))


def _shape(leaf) -> tuple[int, ...]:
    """The shape of a boxed abstract leaf (``nn.unbox`` would apply its sharding constraint under a mesh)."""
    return tuple((leaf.value if isinstance(leaf, nn.Partitioned) else leaf).shape)


def _leaf_shapes(table: list[Entry]) -> dict[tuple[str, ...], tuple[tuple[int, ...], bool]]:
    """Flax path -> (shape, whether axis 0 stacks layers) for every params leaf of a table."""
    layers: dict[tuple[str, ...], int] = {}
    shapes: dict[tuple[str, ...], tuple[int, ...]] = {}
    for e in table:
        shapes[e.flax_path] = e.flax_shape
        if e.layer is not None:
            layers[e.flax_path] = max(layers.get(e.flax_path, 0), e.layer + 1)
    return {p: (((layers[p], *s), True) if p in layers else (s, False)) for p, s in shapes.items()}


# --------------------------------------------------------------------------------------------------- write


class StoreWriter:
    """Creates the Orbax items of a converted checkpoint and fills them one release tensor at a time.

    ``leaf_dtype(path)`` gives the stored dtype of each params leaf. Chunks follow ``LOGICAL_AXIS_RULES``
    (see ``orbax_items.chunk_shape``) so that a restore onto a mesh reads each device's shard alone.
    """

    def __init__(self, directory: Path, kind: str, cfg: ml_collections.ConfigDict,
                 leaf_dtype: Callable[[tuple[str, ...]], np.dtype]):
        self.directory = directory
        table = table_for(kind, cfg)
        boxed = _leaves(abstract_params(kind, cfg))
        self._params = ItemWriter(directory / PARAMS_ITEM)
        self._extra: ItemWriter | None = None
        self._chunks: dict[tuple[str, ...], tuple[int, ...]] = {}
        self._dtypes: dict[tuple[str, ...], np.dtype] = {}
        for path, (shape, stacked) in _leaf_shapes(table).items():
            box = boxed.get(path)
            if box is None or _shape(box) != shape:
                raise RuntimeError(f"mapping table and model disagree on {'/'.join(path)}: table {shape}, model "
                                   f"{None if box is None else _shape(box)}")
            mesh_axes = nn.logical_to_mesh_axes(box.names, LOGICAL_AXIS_RULES) if isinstance(box, nn.Partitioned) \
                else (None,) * len(shape)
            dtype = np.dtype(leaf_dtype(path))
            chunks = chunk_shape(shape, [a for a, m in enumerate(mesh_axes) if m is not None], dtype.itemsize,
                                 layer_axis=stacked)
            self._params.create(path, shape, dtype, chunks)
            self._chunks[path], self._dtypes[path] = chunks, dtype

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, *exc) -> None:
        # A write still in flight after an error would recreate files in a folder its caller is about to delete.
        for item in (self._params, self._extra):
            if item is not None:
                item.drain()

    def write_param(self, entry: Entry, torch_array: np.ndarray) -> None:
        view = flax_view(entry, torch_array)
        prefix = () if entry.layer is None else (entry.layer,)
        dtype = self._dtypes[entry.flax_path]
        for box in blocks(entry.flax_shape, self._chunks[entry.flax_path][len(prefix):], dtype.itemsize):
            block = np.empty([s.stop - s.start for s in box], dtype)
            tiled_copy(block, view[box])
            self._params.write(entry.flax_path, prefix + box, block)

    def write_extra(self, record: TensorRecord, array: np.ndarray) -> None:
        if self._extra is None:
            self._extra = ItemWriter(self.directory / EXTRA_ITEM)
        entry = _extra_entry(record)
        chunks = chunk_shape(array.shape, (), array.itemsize)
        self._extra.create(entry.flax_path, array.shape, array.dtype, chunks)
        for box in blocks(array.shape, chunks, array.itemsize):
            self._extra.write(entry.flax_path, box, np.ascontiguousarray(array[box]))

    def finish(self, manifest: Manifest) -> None:
        self._params.finish()
        if self._extra is not None:
            self._extra.finish()
        write_manifest(self.directory, manifest)


# ---------------------------------------------------------------------------------------------------- read


class ConvertedView(TensorView):
    """The tensors of a converted checkpoint as a ``TensorView``: by release key, in the release layout."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.kind = self.manifest.kind
        self.cfg = self.manifest.model_config()
        self.schema = self.cfg.get("schema") if self.kind == "nextstep" else None
        layout = {True: ", scanned layers", False: ", per-layer"}.get(self.cfg.get("scan_layers"), "")
        self.format = f"converted checkpoint (Orbax{layout})"
        self._records = {r.key: r for r in self.manifest.tensors}
        self._entries = {e.torch_key: e for e in self.manifest.table(self.cfg)}
        self._params = ItemReader(self.path / PARAMS_ITEM)
        self._extra = ItemReader(self.path / EXTRA_ITEM) if any(r.extra for r in self.manifest.tensors) else None

    def keys(self) -> list[str]:
        return list(self._records)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._records[key].shape

    def dtype(self, key: str) -> np.dtype:
        return DTYPES[self._records[key].stored_dtype]

    def read(self, key: str, dtype=None) -> np.ndarray:
        """The tensor in the release layout, in ``dtype`` (default: as stored)."""
        record = self._records[key]
        out = np.empty(record.shape, dtype or self.dtype(key))
        if record.extra:
            reader, entry = self._extra, _extra_entry(record)
        else:
            reader, entry = self._params, self._entries[canonical_key(key)]
        prefix = () if entry.layer is None else (entry.layer,)
        view = flax_view(entry, out)
        stored = reader.shape(entry.flax_path)
        if stored[len(prefix):] != entry.flax_shape or (prefix and stored[0] <= entry.layer):
            raise CheckpointError(f"{self.path}: {'/'.join(entry.flax_path)} has shape {stored}, the manifest "
                                  f"expects {entry.flax_shape} for {key!r}")
        chunks = reader.chunks(entry.flax_path)[len(prefix):]
        for box, block in reader.read_blocks(entry.flax_path, blocks(entry.flax_shape, chunks, out.itemsize), prefix):
            tiled_copy(view[box], block)
        return out

    def close(self) -> None:
        """Nothing to release: tensorstore handles close with the object."""


# ------------------------------------------------------------------------------------------------- restore


def _targets(kind: str, cfg, mesh: Mesh | None, rules) -> dict[tuple[str, ...], tuple[tuple[int, ...], Any]]:
    """Flax path -> (shape, sharding) of every params leaf."""
    boxed = abstract_params(kind, cfg)
    shapes = {path: _shape(leaf) for path, leaf in _leaves(boxed).items()}
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        return {path: (shape, device) for path, shape in shapes.items()}
    shardings = traverse_util.flatten_dict(shardings_of(boxed, mesh, rules))
    return {path: (shape, shardings[path]) for path, shape in shapes.items()}


def restore_params(path: str | Path, mesh: Mesh | None = None, *, rules=LOGICAL_AXIS_RULES, dtype=None
                   ) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) of a converted checkpoint (NextStep or VAE) in its stored layout, as jax Arrays.

    ``mesh``: every leaf sharded by its logical axis names through ``rules``, each device reading only its
    own shard (through Orbax); None puts everything on the first device. ``dtype``: cast every leaf while
    reading (None keeps the stored dtypes).
    """
    manifest = read_manifest(path)
    cfg = manifest.model_config()
    item = ItemReader(Path(path) / PARAMS_ITEM)
    targets = _targets(manifest.kind, cfg, mesh, rules)
    mismatch = sorted("/".join(p) for p in set(targets) ^ set(item.paths))
    mismatch += sorted(f"{'/'.join(p)} {item.shape(p)} vs {shape}" for p, (shape, _) in targets.items()
                       if p in item.paths and item.shape(p) != shape)
    if mismatch:
        raise CheckpointError(f"{path}: params and config disagree on {mismatch[:5]}")
    target = {p: jax.ShapeDtypeStruct(shape, dtype or item.dtype(p), sharding=sharding)
              for p, (shape, sharding) in targets.items()}
    return cfg, restore_item(item.directory, traverse_util.unflatten_dict(target))
