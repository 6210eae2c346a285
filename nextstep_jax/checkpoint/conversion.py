"""Import, export, inspect and verify: the library behind ``python -m nextstep_jax.convert``.

A conversion validates its whole input (config, key set, every shape) before writing anything, streams one
tensor at a time, and writes into a hidden temporary folder next to the destination that is renamed into
place only once complete: a failed or interrupted run leaves nothing that looks like a checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from nextstep_jax.checkpoint.converted.store import (
    RELEASE_DIR,
    VAE_DIR,
    ConvertedView,
    Manifest,
    StoreWriter,
    TensorRecord,
    is_checkpoint,
)
from nextstep_jax.checkpoint.dtypes import CAST_TARGETS, DTYPES, FLOAT_NAMES, dtype_name
from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.mapping import IGNORED_TORCH_KEYS
from nextstep_jax.checkpoint.release.folder import Release, canonical_key, open_release
from nextstep_jax.checkpoint.release.safetensors import (
    INDEX_FILE_NAME,
    SafetensorsView,
    TensorSpec,
    write_safetensors,
    write_sharded,
)
from nextstep_jax.checkpoint.release.torch_pickle import TorchPickleView
from nextstep_jax.checkpoint.tensor_view import TensorView
from nextstep_jax.io.atomic import atomic_folder

__all__ = ["ConversionReport", "export_release", "format_inspection", "import_release", "inspect_checkpoint",
           "open_tensors", "parse_size", "verify_checkpoints"]

_WEIGHT_SUFFIXES = {".safetensors", ".pt", ".pth", ".bin", ".ckpt", ".msgpack", ".h5"}
VAE_EXPORT_FILE = "checkpoint.safetensors"
_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


@dataclasses.dataclass(frozen=True)
class ConversionReport:
    destination: Path
    tensors: int
    bytes: int  # tensor bytes read
    seconds: float
    skipped: tuple[str, ...] = ()  # release entries not carried along, with the reason

    @property
    def mb_per_s(self) -> float:
        return self.bytes / 1e6 / max(self.seconds, 1e-9)


def parse_size(text: str | int) -> int:
    """Bytes from "5GB" (decimal units, as transformers), "512MiB" (binary) or a plain integer."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]I?B|B)?\s*", str(text).upper())
    if not match:
        raise ValueError(f"invalid size {text!r} (examples: 5GB, 500MB, 2GiB, 1000000)")
    size = int(float(match[1]) * _SIZE_UNITS[match[2] or ""])
    if size <= 0:
        raise ValueError(f"size must be positive, got {text!r}")
    return size


def _output(dest: str | Path, overwrite: bool):
    """The atomic destination folder of a conversion (see ``io.atomic.atomic_folder``)."""
    if Path(dest).exists() and not overwrite:
        raise CheckpointError(f"{Path(dest).absolute()}: already exists (pass --overwrite to replace it)")
    return atomic_folder(dest, overwrite=overwrite)


def _progress(total: int, desc: str, enabled: bool | None) -> tqdm:
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False,
                disable=None if enabled is None else not enabled)


def _copy_contents(src: Path, dst: Path) -> None:
    """Copy a file or folder by content only, so what is written gets the ordinary umask modes, not the
    source's (a read-only release must not give a read-only checkpoint)."""
    if src.is_dir():
        dst.mkdir(exist_ok=True)
        for item in sorted(src.iterdir()):
            _copy_contents(item, dst / item.name)
    else:
        shutil.copyfile(src, dst)


def _copy_release_files(folder: Path, weight_files: tuple[Path, ...], out: Path, converted: set[str]
                        ) -> list[str]:
    """Copy every file of a release except its weights (tokenizer files, config, code) into ``out``;
    returns what was left out. ``converted``: names of sub-folders converted on their own (``vae/``)."""
    weights = {p.resolve() for p in weight_files}
    skipped = []
    for item in sorted(folder.iterdir()):
        if item.name.startswith(".") or item.resolve() in weights or item.name in converted:
            continue
        if item.is_dir():
            if is_checkpoint(item) or any(p.suffix in _WEIGHT_SUFFIXES for p in item.rglob("*")):
                skipped.append(f"{item.name}/ (holds weights; convert it separately)")
            else:
                _copy_contents(item, out / item.name)
        elif item.suffix in _WEIGHT_SUFFIXES:
            skipped.append(f"{item.name} (weights this release does not use)")
        elif item.is_file():
            _copy_contents(item, out / item.name)
    return skipped


def _records(release: Release, cast: str | None) -> tuple[TensorRecord, ...]:
    """One record per release tensor, in release order, with the dtype it will be stored in."""
    tensors = release.tensors
    params = {release.spelled[e.torch_key] for e in release.table}
    records = []
    for key in tensors.keys():
        source = dtype_name(tensors.dtype(key))
        extra = key not in params
        stored = source if cast is None or extra or source not in FLOAT_NAMES else cast
        records.append(TensorRecord(key, tensors.shape(key), source, stored, tensors.file_of(key), extra))
    return tuple(records)


def _leaf_dtypes(release: Release, records: tuple[TensorRecord, ...]) -> dict[tuple[str, ...], str]:
    """The stored dtype of each params leaf; the layers stacked into one leaf must agree."""
    by_key = {r.key: r for r in records}
    first: dict[tuple[str, ...], str] = {}
    for e in release.table:
        key = release.spelled[e.torch_key]
        other = first.setdefault(e.flax_path, key)
        if by_key[key].stored_dtype != by_key[other].stored_dtype:
            raise CheckpointError(f"{release.tensors.path}: tensor {key!r} is {by_key[key].stored_dtype} but "
                                  f"{other!r} is {by_key[other].stored_dtype}, and both go into one stacked leaf "
                                  "(pass --dtype or --no-scan-layers)")
    return {path: by_key[key].stored_dtype for path, key in first.items()}


def import_release(src: str | Path, dest: str | Path, *, dtype: str | None = None, scan_layers: bool = True,
                   overwrite: bool = False, progress: bool | None = None) -> ConversionReport:
    """A release folder (NextStep or VAE) -> a converted checkpoint at ``dest``.

    ``dtype`` ("bfloat16", "float16", "float32") casts the floating-point parameters; None keeps each
    tensor's dtype. Non-parameter tensors (``gen_pos_embed``) are kept as they are. ``scan_layers`` stacks
    the decoder layers into ``[layers, ...]`` leaves (NextStep only). A NextStep release's ``vae/`` (a VAE
    release: it has a config.json) is converted along into ``dest/vae``.
    """
    start = time.perf_counter()
    release = open_release(src, scan_layers=scan_layers)
    vae = release.folder / VAE_DIR
    nested = {VAE_DIR} if release.kind == "nextstep" and (vae / "config.json").is_file() else set()
    with release.tensors as tensors:
        records = _records(release, None if dtype is None else CAST_TARGETS[dtype])
        leaf_dtypes = _leaf_dtypes(release, records)
        reader = tensors.reader if isinstance(tensors, SafetensorsView) else None
        manifest = Manifest(release.kind, release.cfg.to_dict(), records,
                            reader.metadata if reader else {}, reader.index_metadata if reader else None)
        total = sum(math.prod(r.shape) * DTYPES[r.source_dtype].itemsize for r in records)
        with _output(dest, overwrite) as tmp, _progress(total, "import", progress) as bar:
            (tmp / RELEASE_DIR).mkdir()
            skipped = _copy_release_files(release.folder, tensors.weight_files, tmp / RELEASE_DIR, nested)
            vae_report = (import_release(vae, tmp / VAE_DIR, dtype=dtype, progress=progress) if nested
                          else ConversionReport(tmp / VAE_DIR, 0, 0, 0.0))
            with StoreWriter(tmp, release.kind, release.cfg, lambda path: DTYPES[leaf_dtypes[path]]) as writer:
                for e in release.table:
                    array = release.read(e.torch_key)
                    writer.write_param(e, array)
                    bar.update(array.nbytes)
                    del array  # before the next read: one tensor in memory at a time
                for record in records:
                    if record.extra:
                        array = tensors.read(record.key)
                        writer.write_extra(record, array)
                        bar.update(array.nbytes)
                writer.finish(manifest)
    return ConversionReport(Path(dest), len(records) + vae_report.tensors, total + vae_report.bytes,
                            time.perf_counter() - start, tuple(skipped))


def _write_like_release(out: Path, specs: list[TensorSpec], manifest: Manifest) -> None:
    """The release's own files again: each tensor in the file it came from, plus the index if sharded."""
    files: dict[str, list[TensorSpec]] = {}
    for spec, record in zip(specs, manifest.tensors):
        files.setdefault(record.file, []).append(spec)
    for name, shard in files.items():
        write_safetensors(out / name, shard, manifest.metadata)
    if manifest.index_metadata is not None:
        index = {
            "metadata": {**manifest.index_metadata, "total_size": sum(s.nbytes for s in specs)},
            "weight_map": {spec.key: record.file for spec, record in zip(specs, manifest.tensors)},
        }
        (out / INDEX_FILE_NAME).write_text(json.dumps(index, indent=2, sort_keys=True))


def _set_torch_dtype(config_path: Path, dtype: str) -> None:
    config = json.loads(config_path.read_text())
    if "torch_dtype" in config:
        config["torch_dtype"] = dtype
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def export_release(src: str | Path, dest: str | Path, *, max_shard_size: int | None = None,
                   dtype: str | None = None, overwrite: bool = False, progress: bool | None = None
                   ) -> ConversionReport:
    """A converted checkpoint -> the official layout at ``dest``, loadable by the PyTorch release code.

    NextStep: ``config.json`` as imported, the release's other files, and its safetensors files: the same
    files as the release when ``max_shard_size`` is None, else re-sharded (``model.safetensors`` if it all
    fits, else ``model-XXXXX-of-YYYYY.safetensors`` + ``model.safetensors.index.json``). VAE:
    ``config.json`` + ``checkpoint.safetensors`` with the release's key names. Every tensor is written in the
    dtype it had in the release unless ``dtype`` says otherwise for the floating-point parameters. A VAE
    converted along with the model exports into ``dest/vae``.
    """
    start = time.perf_counter()
    cast = None if dtype is None else CAST_TARGETS[dtype]
    store = ConvertedView(src)
    manifest = store.manifest
    if manifest.kind == "vae" and max_shard_size is not None:
        raise CheckpointError(f"{src}: a VAE exports as one {VAE_EXPORT_FILE}; --max-shard-size does not apply")
    out_dtypes = [r.source_dtype if cast is None or r.extra or r.source_dtype not in FLOAT_NAMES else cast
                  for r in manifest.tensors]
    total = sum(math.prod(r.shape) * DTYPES[d].itemsize for r, d in zip(manifest.tensors, out_dtypes))
    with _output(dest, overwrite) as tmp, _progress(total, "export", progress) as bar:
        def produce(key: str, out_dtype: np.dtype) -> np.ndarray:
            array = store.read(key, out_dtype)
            bar.update(array.nbytes)
            return array

        specs = [TensorSpec(r.key, r.shape, DTYPES[d], lambda k=r.key, d=DTYPES[d]: produce(k, d))
                 for r, d in zip(manifest.tensors, out_dtypes)]
        _copy_contents(Path(src) / RELEASE_DIR, tmp)
        if cast is not None and manifest.kind == "nextstep":
            _set_torch_dtype(tmp / "config.json", dtype)
        if manifest.kind == "vae":
            write_safetensors(tmp / VAE_EXPORT_FILE, specs, manifest.metadata or {"format": "pt"})
        elif max_shard_size is not None:
            write_sharded(tmp, specs, max_shard_size, manifest.metadata)
        else:
            _write_like_release(tmp, specs, manifest)
        vae = Path(src) / VAE_DIR
        vae_report = (export_release(vae, tmp / VAE_DIR, dtype=dtype, progress=progress)
                      if manifest.kind == "nextstep" and is_checkpoint(vae) else ConversionReport(vae, 0, 0, 0.0))
    return ConversionReport(Path(dest), len(specs) + vae_report.tensors, total + vae_report.bytes,
                            time.perf_counter() - start)


# --------------------------------------------------------------------------------------------- inspect


def open_tensors(path: str | Path) -> TensorView:
    """A read-only tensor view of any checkpoint: a converted checkpoint, a release folder (validated
    against its config), or bare tensors (any ``*.safetensors`` file, index file or folder of them, or a
    ``torch.save`` ``*.pt`` file)."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file or folder")
    if is_checkpoint(path):
        return ConvertedView(path)
    if path.is_dir() and (path / "config.json").is_file():
        return open_release(path).tensors
    if path.suffix == ".pt":
        return TorchPickleView(path)
    return SafetensorsView(path)


def inspect_checkpoint(path: str | Path) -> dict[str, Any]:
    """Summary of any checkpoint: format, kind, schema, every tensor, parameter count, total bytes."""
    with open_tensors(path) as view:
        tensors = [{"key": k, "shape": list(view.shape(k)), "dtype": dtype_name(view.dtype(k))} for k in view.keys()]
        summary = {"path": str(path), "format": view.format, "kind": view.kind, "schema": view.schema}
    buffers = [t["key"] for t in tensors if view.kind is not None and canonical_key(t["key"]) in IGNORED_TORCH_KEYS]
    dtypes: dict[str, int] = {}
    for t in tensors:
        dtypes[t["dtype"]] = dtypes.get(t["dtype"], 0) + 1
    return {
        **summary,
        "num_tensors": len(tensors),
        "num_parameters": sum(math.prod(t["shape"]) for t in tensors if t["key"] not in buffers),
        "buffers": buffers,
        "total_bytes": sum(math.prod(t["shape"]) * DTYPES[t["dtype"]].itemsize for t in tensors),
        "dtypes": dtypes,
        "tensors": tensors,
    }


def _grouped(tensors: list[dict]) -> list[tuple[str, list[int], str, int]]:
    """(name, shape, dtype, count) rows: numbered components (``layers.7.``) become ``*`` where several
    tensors then share name, shape and dtype."""
    groups: dict[tuple[str, tuple[int, ...], str], list[str]] = {}
    for t in tensors:
        pattern = re.sub(r"(?<=\.)\d+(?=\.)", "*", t["key"])
        groups.setdefault((pattern, tuple(t["shape"]), t["dtype"]), []).append(t["key"])
    return [(name if len(keys) > 1 else keys[0], list(shape), dtype, len(keys))
            for (name, shape, dtype), keys in groups.items()]


def format_inspection(summary: dict[str, Any], all_tensors: bool = False) -> str:
    kind = summary["kind"] or "bare tensors"
    if summary["schema"]:
        kind += f" (release config schema {summary['schema']})"
    dtypes = ", ".join(f"{d}: {n}" for d, n in summary["dtypes"].items())
    buffers = f" (+ buffers: {', '.join(summary['buffers'])})" if summary["buffers"] else ""
    lines = [
        f"path:        {summary['path']}",
        f"format:      {summary['format']}",
        f"kind:        {kind}",
        f"tensors:     {summary['num_tensors']} ({dtypes})",
        f"parameters:  {summary['num_parameters']:,}{buffers}",
        f"total bytes: {summary['total_bytes']:,} ({summary['total_bytes'] / 2**20:.1f} MiB)",
        "",
    ]
    rows = ([(t["key"], t["shape"], t["dtype"], 1) for t in summary["tensors"]] if all_tensors
            else _grouped(summary["tensors"]))
    width = max(len(name) + (len(f" x{n}") if n > 1 else 0) for name, _, _, n in rows) if rows else 0
    for name, shape, dtype, count in rows:
        label = name + (f" x{count}" if count > 1 else "")
        lines.append(f"{label:<{width}}  {str(shape):<22} {dtype}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- verify

_COMPARE_ELEMENTS = 1 << 22  # compared per step, bounding the temporaries to a few tens of MB


def _first_difference(a: np.ndarray, b: np.ndarray, atol: float) -> tuple[int, float] | None:
    """(flat index, |a-b|) of the first element that differs: by bit pattern if ``atol`` is 0, else by more
    than ``atol`` (NaNs equal NaNs); None if none does."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    if atol == 0:
        bits = np.dtype(f"u{a.itemsize}") if a.itemsize in (1, 2, 4, 8) else None
        flat_a, flat_b = (flat_a.view(bits), flat_b.view(bits)) if bits else (flat_a, flat_b)
    for start in range(0, flat_a.size, _COMPARE_ELEMENTS):
        x = flat_a[start:start + _COMPARE_ELEMENTS]
        y = flat_b[start:start + _COMPARE_ELEMENTS]
        if atol == 0:
            bad = np.flatnonzero(x != y)
        else:
            x64, y64 = x.astype(np.float64), y.astype(np.float64)
            bad = np.flatnonzero(~((np.abs(x64 - y64) <= atol) | (np.isnan(x64) & np.isnan(y64))))
        if bad.size:
            i = start + int(bad[0])
            return i, float(abs(a.reshape(-1)[i].astype(np.float64) - b.reshape(-1)[i].astype(np.float64)))
    return None


def _compare(key: str, a: TensorView, b: TensorView, atol: float) -> str | None:
    shape_a, shape_b = tuple(a.shape(key)), tuple(b.shape(key))
    if shape_a != shape_b:
        return f"{key}: shape {list(shape_a)} vs {list(shape_b)}"
    dtype_a, dtype_b = dtype_name(a.dtype(key)), dtype_name(b.dtype(key))
    if atol == 0 and dtype_a != dtype_b:
        return f"{key}: dtype {dtype_a} vs {dtype_b} (pass --atol to compare values across dtypes)"
    x, y = a.read(key), b.read(key)
    found = _first_difference(x, y, atol)
    if found is None:
        return None
    i, delta = found
    index = tuple(int(v) for v in np.unravel_index(i, shape_a)) if shape_a else ()
    return (f"{key}: differs at {list(index)}: {x.reshape(-1)[i]!r} vs {y.reshape(-1)[i]!r} "
            f"(|a-b| = {delta:.6g}, atol {atol:g})")


def verify_checkpoints(a: str | Path, b: str | Path, *, atol: float = 0.0, limit: int = 10,
                       progress: bool | None = None) -> list[str]:
    """Compare two checkpoints of any formats tensor by tensor, by release key, a model's ``vae/`` included.
    Returns the first ``limit`` differences (keys present on one side only, shapes, dtypes, values); empty
    means equal: bit for bit when ``atol`` is 0, else every value within ``atol``."""
    if atol < 0 or math.isnan(atol):
        raise ValueError(f"atol must be >= 0, got {atol}")
    with open_tensors(a) as view_a, open_tensors(b) as view_b:
        keys_a, keys_b = view_a.keys(), view_b.keys()
        set_a, set_b = set(keys_a), set(keys_b)
        differences = [f"{k}: only in {a}" for k in keys_a if k not in set_b]
        differences += [f"{k}: only in {b}" for k in keys_b if k not in set_a]
        common = [k for k in keys_a if k in set_b]
        total = sum(math.prod(view_a.shape(k)) * view_a.dtype(k).itemsize for k in common)
        with _progress(total, "verify", progress) as bar:
            for key in common:
                if len(differences) >= limit:
                    break
                difference = _compare(key, view_a, view_b, atol)
                if difference:
                    differences.append(difference)
                bar.update(math.prod(view_a.shape(key)) * view_a.dtype(key).itemsize)
    vae_a, vae_b = _nested_vae(a), _nested_vae(b)
    if vae_a and vae_b and len(differences) < limit:
        differences += [f"{VAE_DIR}/{d}" for d in verify_checkpoints(vae_a, vae_b, atol=atol, limit=limit,
                                                                     progress=progress)]
    elif vae_a or vae_b:
        differences.append(f"{VAE_DIR}/: only in {a if vae_a else b}")
    return differences[:limit]


def _nested_vae(path: str | Path) -> Path | None:
    """A model's vae/: the release's VAE folder or the one ``import_release`` converted along."""
    vae = Path(path) / VAE_DIR
    return vae if is_checkpoint(vae) or (vae / "config.json").is_file() else None
