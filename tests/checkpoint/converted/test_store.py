"""The converted store: restore_params gives the release's params bit for bit in the stored layout, casts on
request, and on a mesh each device holds (and reads) only its shard."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest
from flax import traverse_util

from nextstep_jax.checkpoint.conversion import import_release
from nextstep_jax.checkpoint.converted.store import ConvertedView, restore_params
from nextstep_jax.checkpoint.mapping import nextstep_table, to_flax
from nextstep_jax.checkpoint.release.folder import open_release

MESH_SCRIPT = Path(__file__).parents[1] / "mesh_restore.py"


@pytest.fixture(scope="module")
def imported_model(golden_dir, tmp_path_factory):
    dest = tmp_path_factory.mktemp("orbax") / "model"
    import_release(golden_dir / "model", dest, progress=False)
    return dest


def _release_leaves(release) -> dict:
    """Flax path -> the release's float32 leaf, computed here from the mapping table alone."""
    out: dict = {}
    for e in release.table:
        value = to_flax(e, release.read(e.torch_key))
        if e.layer is None:
            out[e.flax_path] = value
        else:
            out.setdefault(e.flax_path, {})[e.layer] = value
    return {p: np.stack([v[i] for i in sorted(v)]) if isinstance(v, dict) else v for p, v in out.items()}


@pytest.mark.parametrize("scan_layers", [True, False])
def test_restore_params_equals_the_release_in_the_stored_layout(golden_dir, tmp_path, scan_layers):
    dest = tmp_path / "model"
    import_release(golden_dir / "model", dest, scan_layers=scan_layers, progress=False)
    cfg, params = restore_params(dest)
    release = open_release(golden_dir / "model", scan_layers=scan_layers)
    assert cfg.to_dict() == release.cfg.to_dict() and cfg.scan_layers == scan_layers
    with release.tensors:
        want = _release_leaves(release)
    got = traverse_util.flatten_dict(params)
    assert got.keys() == want.keys()
    for path, array in want.items():
        assert isinstance(got[path], jax.Array) and got[path].dtype == np.float32, path
        assert np.asarray(got[path]).tobytes() == array.tobytes(), path


def test_restore_params_casts_the_vae(golden_dir, tmp_path):
    import_release(golden_dir / "vae", tmp_path / "vae", progress=False)
    cfg, params = restore_params(tmp_path / "vae", dtype=ml_dtypes.bfloat16)
    release = open_release(golden_dir / "vae")
    assert cfg.to_dict() == release.cfg.to_dict()
    with release.tensors:
        want = _release_leaves(release)
    for path, array in want.items():
        got = traverse_util.flatten_dict(params)[path]
        assert got.dtype == ml_dtypes.bfloat16
        np.testing.assert_array_equal(np.asarray(got), array.astype(ml_dtypes.bfloat16), err_msg=str(path))


def test_converted_view_reads_the_release_layout(golden_dir, imported_model):
    release = open_release(golden_dir / "model")
    with release.tensors, ConvertedView(imported_model) as view:
        assert view.kind == "nextstep" and view.format == "converted checkpoint (Orbax, scanned layers)"
        assert view.keys() == release.tensors.keys()
        for e in nextstep_table(release.cfg):
            assert view.shape(e.torch_key) == e.torch_shape
            assert view.read(e.torch_key).tobytes() == release.read(e.torch_key).tobytes(), e.torch_key


def test_mesh_restore_matches_single_device_and_reads_only_own_shards(imported_model):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(MESH_SCRIPT), str(imported_model)], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8
    assert not r["value_mismatch"] and not r["sharding_mismatch"] and not r["bad_shard_shape"], r
    assert r["split_leaves"] >= r["leaves"] * 3 // 4, r  # most leaves really are split
    assert not r["foreign_chunks"], r
    layers, embed, heads, head_dim = r["q_shape"]  # [layers, embed, heads, head_dim]
    assert r["q_spec"] == [None, "fsdp", "tensor", None]
    assert r["q_shard_shape"] == [layers, embed // 4, heads // 2, head_dim]
