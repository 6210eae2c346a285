"""`python -m nextstep_jax.plan` on fake CPU devices: the JSON report of a compiled tiny train step, the refusal
of a 14B state that cannot fit 8 chips without FSDP, and bad input (exit 2, the culprit named)."""

import json
import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

from nextstep_jax.plan import CHIPS

REPO = Path(__file__).resolve().parents[1]


def _plan(tmp_path, config, *args):
    out = tmp_path / "plan.json"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    run = subprocess.run([sys.executable, "-m", "nextstep_jax.plan", "--config", str(REPO / "configs" / config),
                          "--out", str(out), *args], capture_output=True, text=True, timeout=900, cwd=REPO, env=env)
    return run, (json.loads(out.read_text()) if out.exists() else None)


def test_tiny_step_report(tmp_path):
    run, report = _plan(tmp_path, "tiny.py", "--devices", "8", "--chip", "v5p", "--config.mesh.data=2",
                        "--config.mesh.fsdp=2", "--config.mesh.tensor=2", "--config.data.batch_size=8",
                        "--config.data.seq_len=64", "--config.train_step.microbatches=2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert report["fits"] is True and report["devices"] == 8 and report["microbatches"] == 2
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    assert report["device_memory_bytes"] == CHIPS["v5p"]["memory_bytes"]
    per = report["per_device_bytes"]
    assert per["total"] == per["arguments"] + per["outputs"] - per["aliased"] + per["temporaries"] + per["code"]
    assert per["aliased"] >= report["input_bytes"]["state"] > 0  # the donated state is updated in place
    assert report["flops_per_step"]["xla"] > 0 and report["flops_per_step"]["analytic_model"] > 0
    assert 0 < report["projected"]["mfu"] <= 1
    for line in ("per device: total", "FLOPs/step analytic_model", "MFU"):
        assert line in run.stdout


def test_14b_without_fsdp_on_8_chips_is_refused(tmp_path):
    run, report = _plan(tmp_path, "14b.py", "--devices", "8", "--chip", "v5p", "--config.mesh.fsdp=1",
                        "--config.mesh.data=8", "--config.data.batch_size=8", "--config.train_step.microbatches=1")
    assert run.returncode == 1, run.stderr[-3000:]
    assert report["fits"] is False and report["per_device_bytes"] is None
    # 15.0B float32 params and two float32 AdamW moments, replicated on every chip.
    assert report["input_bytes"]["state"] > 3 * 4 * 14.9e9
    assert "alone needs" in report["reason"] and "mesh.fsdp" in report["reason"] and "alone needs" in run.stdout


def test_bad_input_names_the_culprit(tmp_path):
    run, report = _plan(tmp_path, "tiny.py", "--devices", "2", "--config.mesh.tensor=2", "--config.mesh.fsdp=1",
                        "--config.model.num_heads=3")
    assert run.returncode == 2 and report is None
    assert "model.num_heads=3 is not divisible by mesh axis tensor=2" in run.stderr
    run, _ = _plan(tmp_path, "tiny.py", "--devices", "2", "--config.mesh.bogus=1")
    assert run.returncode == 2 and "mesh.bogus" in run.stderr


@pytest.mark.skipif(find_spec("libtpu") is not None, reason="the TPU runtime is installed here")
def test_topology_without_tpu_runtime_says_what_to_install(tmp_path):
    run, _ = _plan(tmp_path, "tiny.py", "--topology", "v5p:2x2x2")
    assert run.returncode == 2 and "requirements-tpu.txt" in run.stderr
