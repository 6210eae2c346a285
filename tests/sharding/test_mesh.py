"""Mesh code on 8 fake CPU devices must match the single-device result (run in a subprocess so the
device count is set before jax is imported)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nextstep_jax.sharding import make_mesh

SCRIPT = Path(__file__).with_name("mesh_equivalence.py")


def test_golden_model_on_8_devices_matches_single_device(golden_dir):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, str(SCRIPT), str(golden_dir / "model")], env=env, capture_output=True,
                         text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
    assert r["hidden_err"] < 1e-4 and r["decode_err"] < 1e-4 and r["fused_decode_err"] < 1e-4, r
    assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5), r
    assert r["grad_err"] <= 1e-4 * r["grad_scale"], r
    # q kernel [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor.
    assert r["q_spec"] == [None, "fsdp", "tensor", None], r
    layers, embed, heads, head_dim = r["q_shape"]
    assert r["q_shard_shape"] == [layers, embed // 2, heads // 2, head_dim], r
    # Fused q/k/v [layers, embed, kv_heads, G+2, head_dim]: kv heads over tensor, so each group stays whole.
    assert r["qkv_spec"] == [None, "fsdp", "tensor", None, None], r
    layers, embed, kv_heads, group, head_dim = r["qkv_shape"]
    assert r["qkv_shard_shape"] == [layers, embed // 2, kv_heads // 2, group, head_dim], r
    # Created directly sharded, with the same values as an unsharded init from the same key.
    assert r["init_err"] == 0.0 and r["init_q_shard_shape"] == r["q_shard_shape"], r
    assert r["batch_spec"][0] == ["data", "fsdp"] and not any(r["batch_spec"][1:]), r


def test_make_mesh_validates_shape():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 1})
    with pytest.raises(ValueError, match="needs 4 devices"):
        make_mesh({"fsdp": 4})
    with pytest.raises(ValueError, match="at most one"):
        make_mesh({"fsdp": -1, "tensor": -1})
