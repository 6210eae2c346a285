"""Mesh code on 8 fake CPU devices must match the single-device result (run in a subprocess so the
device count is set before jax is imported); mesh construction, the indivisible-dimension policy and the
up-front refusal of configs a mesh cannot split."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import ml_collections
import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from nextstep_jax.configs import model_config
from nextstep_jax.sharding import MESH_AXES, fit_spec, make_mesh, validate_mesh
from train_runs import environment

SCRIPT = Path(__file__).with_name("mesh_equivalence.py")


@pytest.fixture(scope="module")
def report(golden_dir):
    env = environment(8)
    out = subprocess.run([sys.executable, str(SCRIPT), str(golden_dir / "model")], env=env, capture_output=True,
                         text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_meshes_match_one_device(report):
    assert len(report["meshes"]) >= 3
    assert any(m["mesh"]["tensor"] > report["kv_heads"] for m in report["meshes"])
    for m in report["meshes"]:
        assert m["loss"][0] == pytest.approx(m["loss"][1], rel=1e-5), m
        # Per tensor, relative to that tensor's largest value.
        assert m["grad_err"] <= 1e-4 and m["step_metrics_err"] <= 1e-5, m
        assert m["updated_params_err"] <= 1e-4 < m["update_size"], m
        assert m["lm_gathered"] == 1.0, m  # the step's LM head ran on the gathered text targets
    chunked = report["chunked"]
    assert chunked["loss"][0] == pytest.approx(chunked["loss"][1], rel=1e-5), chunked
    assert chunked["grad_err"] <= 1e-4 and chunked["updated_params_err"] <= 1e-4, chunked
    assert report["microbatches"]["loss"][0] == pytest.approx(report["microbatches"]["loss"][1], rel=1e-5)
    assert report["microbatches"]["updated_params_err"] <= 1e-4, report["microbatches"]


@pytest.mark.slow
def test_lowered_programs_carry_sharding_constraints(report):
    for m in report["meshes"]:
        assert m["forward_constraints"] > 0 and m["step_constraints"] > m["forward_constraints"], m


@pytest.mark.slow
def test_decode_and_placement(report):
    assert report["decode_err"] < 1e-5 and report["fused_decode_err"] < 1e-5, report
    # q kernel [layers, embed, heads, head_dim]: embed over fsdp, heads over tensor.
    assert report["q_spec"] == [None, "fsdp", "tensor", None], report
    layers, embed, heads, head_dim = report["q_shape"]
    assert report["q_shard_shape"] == [layers, embed // 2, heads // 2, head_dim], report
    # Fused q/k/v [layers, embed, kv_heads, G+2, head_dim]: kv heads over tensor, so each group stays whole.
    assert report["qkv_spec"] == [None, "fsdp", "tensor", None, None], report
    layers, embed, kv_heads, group, head_dim = report["qkv_shape"]
    assert report["qkv_shard_shape"] == [layers, embed // 2, kv_heads // 2, group, head_dim], report
    # Created directly sharded, with the same values as an unsharded init from the same key.
    assert report["init_err"] == 0.0 and report["init_q_shard_shape"] == report["q_shard_shape"], report
    assert report["batch_spec"][0] == ["data", "fsdp"] and not any(report["batch_spec"][1:]), report


@pytest.mark.slow
def test_indivisible_dimensions_are_replicated(report):
    odd = report["odd"]
    assert odd["vocab_size"] % 2
    assert odd["loss"][0] == pytest.approx(odd["loss"][1], rel=1e-5), odd
    assert odd["grad_err"] <= 1e-4 and odd["updated_params_err"] <= 1e-4, odd
    assert odd["k_spec"] == [None, "fsdp", None, None], odd  # one KV head: not split over tensor
    assert odd["embed_spec"] == [None, "fsdp"], odd  # odd vocabulary: not split over tensor


@pytest.mark.slow
def test_temporaries_fall_as_the_batch_is_split(report):
    temps = report["temporaries"]  # batch split 1, 2, 4, 8 ways
    assert all(b < a for a, b in zip(temps, temps[1:])), temps
    assert temps[-1] < temps[0] / 4, temps


def test_fit_spec_drops_axes_that_do_not_divide():
    sizes = {"data": 2, "fsdp": 4, "tensor": 2, "sequence": 1}
    assert fit_spec(PartitionSpec(("data", "fsdp"), "tensor"), (6, 3), sizes) == PartitionSpec("data", None)
    assert fit_spec(PartitionSpec(("data", "fsdp"), "tensor"), (8, 4), sizes) == PartitionSpec(("data", "fsdp"),
                                                                                              "tensor")
    assert fit_spec(PartitionSpec("tensor"), (1, 5), sizes) == PartitionSpec(None, None)


def _abstract_mesh(**sizes):
    shape = {a: 1 for a in MESH_AXES} | sizes
    return AbstractMesh(tuple(shape.values()), MESH_AXES)


def test_validate_mesh_names_field_and_axis():
    config = ml_collections.ConfigDict({"model": model_config(), "data": {"batch_size": 256, "seq_len": 8192},
                                        "train_step": {"microbatches": 4}})
    validate_mesh(config, _abstract_mesh(fsdp=64))
    validate_mesh(config, _abstract_mesh(fsdp=8, tensor=8))  # 8 KV heads, 40 heads, 13824 MLP: all divide
    with pytest.raises(ValueError, match=r"model.num_heads=40 is not divisible by mesh axis tensor=16"):
        validate_mesh(config, _abstract_mesh(fsdp=4, tensor=16))
    with pytest.raises(ValueError, match=r"data.batch_size / train_step.microbatches=64 is not divisible "
                                         r"by mesh axis dataxfsdp=128"):
        validate_mesh(config, _abstract_mesh(data=2, fsdp=64))
    config.train_step.microbatches = 3
    with pytest.raises(ValueError, match=r"data.batch_size=256 is not divisible by train_step.microbatches=3"):
        validate_mesh(config, _abstract_mesh(fsdp=64))


def test_make_mesh_validates_shape():
    with pytest.raises(ValueError, match="unknown mesh axes"):
        make_mesh({"model": 1})
    with pytest.raises(ValueError, match=f"needs 4 devices, have {jax.device_count()}"):
        make_mesh({"fsdp": 4})
    with pytest.raises(ValueError, match="at most one"):
        make_mesh({"fsdp": -1, "tensor": -1})


def test_multi_slice_mesh_puts_data_across_slices():
    """Devices of 2 slices, interleaved in the device list: ``data`` spans the slices, ``fsdp`` stays inside one."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class SliceDevice:  # what create_hybrid_device_mesh reads of a TPU device
        id: int
        slice_index: int
        platform: str = "cpu"
        device_kind: str = "cpu"
        process_index: int = 0

    devices = [SliceDevice(i, i % 2) for i in range(8)]
    mesh = make_mesh({"data": 2, "fsdp": -1}, devices)
    slice_of = np.vectorize(lambda d: d.slice_index)(mesh.devices)
    assert mesh.shape["fsdp"] == 4
    assert (slice_of[0] == slice_of[0].flat[0]).all() and (slice_of[1] == slice_of[1].flat[0]).all()
    assert slice_of[0].flat[0] != slice_of[1].flat[0]
    with pytest.raises(ValueError, match="mesh.data=1 must be a multiple of the 2 slices"):
        make_mesh({"fsdp": -1}, devices)
