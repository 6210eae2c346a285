"""Official release folders as Flax params: ``sources.open_release`` validates the folder against its config
(``validation``), then the mapping table builds the params one tensor at a time."""

from __future__ import annotations

from pathlib import Path

import ml_collections
import numpy as np

from nextstep_jax.checkpoint.mapping import params_from_tensors
from nextstep_jax.checkpoint.sources import Release, open_release


def _params(release: Release, param_dtype) -> dict:
    def get(key: str) -> np.ndarray:
        array = release.tensors.read(release.spelled[key])
        return array if param_dtype is None else array.astype(param_dtype, copy=False)

    with release.tensors:
        return params_from_tensors(release.table, get)


def load_nextstep(folder: str | Path, *, scan_layers: bool = True, param_dtype=np.float32
                  ) -> tuple[ml_collections.ConfigDict, dict]:
    """(config, params) from a release folder: ``config.json`` + ``model.safetensors`` or sharded
    ``model-XXXXX-of-YYYYY.safetensors`` + ``model.safetensors.index.json``."""
    release = open_release(folder, kind="nextstep", scan_layers=scan_layers)
    return release.cfg, _params(release, param_dtype)


def load_vae(folder: str | Path, *, param_dtype=np.float32) -> tuple[ml_collections.ConfigDict, dict]:
    """(vae config, params) from a tokenizer release folder: ``config.json`` + ``checkpoint.pt`` (read
    without torch, through a restricted unpickler) or ``checkpoint.safetensors``."""
    release = open_release(folder, kind="vae")
    return release.cfg, _params(release, param_dtype)
