"""The one loading call: a model or VAE from an official release folder or a converted checkpoint.

    NextStep release   config.json + model.safetensors, or model.safetensors.index.json + shards
    VAE release        config.json + checkpoint.safetensors or checkpoint.pt (read without torch)
    converted          a folder written by ``python -m nextstep_jax.convert import``

Params come back as jax Arrays in the layout asked for (``models.layouts``), on the first device or sharded
over a mesh by their logical axis names. A release is read one leaf at a time onto its devices; a converted
checkpoint is restored through Orbax, each device reading only its own shard. Either way the host never
holds more than one leaf, and a layout change runs on device, one piece at a time.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import traverse_util
from jax.sharding import Mesh, SingleDeviceSharding

from nextstep_jax.checkpoint.converted.store import (
    RELEASE_DIR,
    abstract_params,
    is_checkpoint,
    read_manifest,
    restore_params,
)
from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.mapping import params_from_tensors
from nextstep_jax.checkpoint.release.folder import Release, open_release
from nextstep_jax.models.layouts import fuse_projections, scan_to_unrolled, unrolled_to_scan
from nextstep_jax.sharding import LOGICAL_AXIS_RULES, shardings_of, use_mesh

__all__ = ["LAYER_LAYOUTS", "load_model", "load_vae", "read_model_config", "read_vae_config", "release_files"]

LAYER_LAYOUTS = ("scanned", "unrolled")


def _open_release(path: Path, kind: str, scan_layers: bool = True) -> Release:
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json (expected an official release folder or a checkpoint "
                              "converted by nextstep_jax.convert)")
    return open_release(path, kind=kind, scan_layers=scan_layers)


def _manifest(path: Path, kind: str):
    manifest = read_manifest(path)
    if manifest.kind != kind:
        raise CheckpointError(f"{path}: a converted {manifest.kind} checkpoint, expected {kind}")
    return manifest


def _config(path: str | Path, kind: str) -> ml_collections.ConfigDict:
    path = Path(path)
    if is_checkpoint(path):
        return _manifest(path, kind).model_config()
    release = _open_release(path, kind)
    release.tensors.close()
    return release.cfg


def read_model_config(path: str | Path) -> ml_collections.ConfigDict:
    """The model config of a release folder or converted checkpoint, checked against its tensor headers
    but without reading any weights (so a caller can validate its inputs before the long load)."""
    return _config(path, "nextstep")


def read_vae_config(path: str | Path) -> ml_collections.ConfigDict:
    """The VAE config of a release folder or converted checkpoint, without reading any weights."""
    return _config(path, "vae")


def release_files(path: str | Path) -> Path:
    """The folder holding a model's release files (tokenizer, config.json): the release folder itself, or
    the copy a converted checkpoint keeps."""
    path = Path(path)
    return path / RELEASE_DIR if is_checkpoint(path) else path


def _release_params(release: Release, dtype, mesh: Mesh | None, rules) -> dict:
    """The params of a validated release, one leaf at a time onto its device(s)."""
    if mesh is None:
        device = SingleDeviceSharding(jax.devices()[0])
        place = lambda path, leaf: jax.device_put(leaf, device)  # noqa: E731
    else:
        shardings = traverse_util.flatten_dict(shardings_of(abstract_params(release.kind, release.cfg), mesh, rules))
        place = lambda path, leaf: jax.device_put(leaf, shardings[path])  # noqa: E731

    def get(key: str) -> np.ndarray:
        array = release.read(key)
        return array if dtype is None else array.astype(dtype, copy=False)

    with release.tensors:
        return params_from_tensors(release.table, get, place)


def _load(path: str | Path, kind: str, dtype, mesh: Mesh | None, rules, scan_layers: bool | None):
    """(config, params) as stored, or with the layer layout ``scan_layers`` (NextStep)."""
    path = Path(path)
    dtype = None if dtype is None else np.dtype(dtype)
    if not is_checkpoint(path):
        release = _open_release(path, kind, True if scan_layers is None else scan_layers)
        return release.cfg, _release_params(release, dtype, mesh, rules)
    _manifest(path, kind)
    cfg, params = restore_params(path, mesh, rules=rules, dtype=dtype)
    if scan_layers is not None and scan_layers != cfg.scan_layers:
        relayout = unrolled_to_scan if scan_layers else scan_to_unrolled
        cfg, params = relayout(cfg, params, mesh=mesh, rules=rules, donate=True)
    return cfg, params


def _on(mesh: Mesh | None, rules):
    return contextlib.nullcontext() if mesh is None else use_mesh(mesh, rules)


def load_model(path: str | Path, *, dtype=None, layers: str = "scanned", fused: bool = False,
               mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES) -> tuple[ml_collections.ConfigDict, dict]:
    """(model config, params) of a NextStep release folder or converted checkpoint.

    ``dtype``: the params' dtype (None: as stored); the compute dtype stays the config's ``dtype``.
    ``layers``: "scanned" (stacked ``[layers, ...]`` leaves, for training) or "unrolled" (``layers_{i}``,
    for decoding). ``fused``: q/k/v and gate/up fused (``models.layouts``; decoding wants unrolled + fused,
    ``models.layouts.for_decoding``). ``mesh``: every leaf sharded by its logical axis names through
    ``rules``; None puts everything on the first device. Bad files raise ``CheckpointError`` naming them.
    """
    if layers not in LAYER_LAYOUTS:
        raise ValueError(f"layers must be one of {LAYER_LAYOUTS}, got {layers!r}")
    with _on(mesh, rules):
        cfg, params = _load(path, "nextstep", dtype, mesh, rules, scan_layers=layers == "scanned")
        if fused:
            cfg, params = fuse_projections(cfg, params, mesh=mesh, rules=rules, donate=True)
    return cfg, params


def load_vae(path: str | Path, *, dtype=None, mesh: Mesh | None = None, rules=LOGICAL_AXIS_RULES
             ) -> tuple[ml_collections.ConfigDict, dict]:
    """(VAE config, params) of a tokenizer release folder or converted checkpoint; ``dtype`` and ``mesh``
    as for ``load_model``."""
    with _on(mesh, rules):
        return _load(path, "vae", dtype, mesh, rules, scan_layers=None)
