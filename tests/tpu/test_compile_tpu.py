"""The tiny config's train step compiled for a v5p:2x2x2 slice (8 chips) through ``python -m
nextstep_jax.plan``, on a (data, fsdp, tensor) mesh, with pixels (the VAE in the step) and with cached latents."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _plan(tmp_path, *args):
    out = tmp_path / "plan.json"
    run = subprocess.run([sys.executable, "-m", "nextstep_jax.plan", "--config", str(REPO / "configs" / "tiny.py"),
                          "--topology", "v5p:2x2x2", "--out", str(out), *args],
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    return run, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.parametrize("image_input", ["pixels", "latents"])
def test_tiny_train_step_compiles_for_v5p(tmp_path, image_input):
    run, report = _plan(tmp_path, "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2",
                        f"--config.data.image_input={image_input}", "--config.train_step.microbatches=2")
    assert run.returncode == 0, run.stderr[-3000:]
    assert report["fits"] is True and report["chip"] == "v5p" and report["devices"] == 8
    assert report["mesh"] == {"data": 2, "fsdp": 2, "tensor": 2, "sequence": 1}
    per = report["per_device_bytes"]
    assert per["total"] == per["arguments"] + per["outputs"] - per["aliased"] + per["temporaries"] + per["code"]
    assert 0 < per["total"] <= report["device_memory_bytes"]
    # The donated state comes back in place.
    assert per["aliased"] >= report["input_bytes"]["state"] > 0
    flops = report["flops_per_step"]
    assert flops["xla"] > 0 and flops["analytic_hardware"] >= flops["analytic_model"] > 0
    assert report["projected"]["source"].startswith("xla") and 0 < report["projected"]["mfu"] < 1
