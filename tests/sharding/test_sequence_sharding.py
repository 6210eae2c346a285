"""The ``sequence`` mesh axis on 8 fake CPU devices (a subprocess, so the device count is set before jax is
imported): the same loss, gradients and train step as one device, and activations that shrink per device as
the sequence is split."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from train_runs import environment

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).with_name("sequence_sharding.py")


@pytest.fixture(scope="module")
def report(golden_dir):
    env = environment(8)
    out = subprocess.run([sys.executable, str(SCRIPT), str(golden_dir / "model")], env=env, capture_output=True,
                         text=True, timeout=1200, cwd=SCRIPT.parent)
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_sequence_sharded_training_matches_one_device(report):
    for m in report["meshes"]:
        assert m["loss"][0] == pytest.approx(m["loss"][1], rel=1e-5), m
        assert m["grad_err"] <= 1e-4, m
        assert m["updated_params_err"] <= 1e-4 < m["update_size"], m


def test_splash_under_a_sequence_sharded_mesh_matches_one_device(report):
    r = report["splash"]
    assert r["loss"][0] == pytest.approx(r["loss"][1], rel=1e-5), r
    assert r["grad_err"] <= 1e-4, r


def test_sequence_axis_splits_activations(report):
    one, two, four, eight = report["temporaries"]
    # Attention scores and layer activations of a 2048-token row dominate: splitting the sequence n ways
    # divides them nearly n ways (the rest is small: weights gathered per layer, the replicated mask).
    assert two < 0.6 * one and four < 0.35 * one and eight < 0.2 * one, report["temporaries"]
