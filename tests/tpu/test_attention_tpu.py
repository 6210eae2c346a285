"""The splash attention kernel compiled for a TPU topology (v5p:2x2x2, 8 chips) on this host, through the plan's
ahead-of-time route: picked by ``attention_impl="auto"`` for TPU, fed the packed batch's segment ids, sharded
over batch and heads, in the forward and both backward kernels of the train step."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.py"
TOPOLOGY = "v5p:2x2x2"
SPLASH_MESH = {"data": 1, "fsdp": 4, "tensor": 2, "sequence": 1}


def _compiled_train_step(overrides):
    """(plan config, HLO text of the compiled tiny train step) for ``TOPOLOGY``."""
    from jax.experimental import topologies

    from nextstep_jax import plan
    from nextstep_jax.configs import parse_args, resolve
    from nextstep_jax.sharding import make_mesh

    args, overrides = parse_args(plan._parser(), ["--config", str(TINY), "--topology", TOPOLOGY,
                                                  *[f"--config.{o}" for o in overrides]])
    config = resolve(args, overrides, default=plan._defaults())
    devices = topologies.get_topology_desc(platform="tpu", topology_name=TOPOLOGY).devices
    mesh = make_mesh(dict(config.mesh), devices)
    optimizer = plan._optimizer(config)
    state, batch, vae_params = plan._inputs(config, mesh, "train", optimizer)
    compiled = plan._lower(config, mesh, "train", optimizer, state, batch, vae_params).compile()
    return batch, compiled.as_text()


@pytest.fixture(scope="module")
def packed_step():
    overrides = [f"mesh.{k}={v}" for k, v in SPLASH_MESH.items()] + ["data.image_input=latents"]
    return _compiled_train_step(overrides)


def test_train_step_runs_segmented_splash_kernels(packed_step):
    batch, hlo = packed_step
    assert "segment_ids" in batch
    names = set(re.findall(r"splash_mqa_(?:fwd|dq|dkv)\w*", hlo))
    # Forward and both backward kernels, all with segment ids; no dense [B, 1, T, S] mask path.
    for phase in ("fwd", "dq", "dkv"):
        assert any(n.startswith(f"splash_mqa_{phase}_segmented") for n in names), sorted(names)
    assert not any("_segmented" not in n for n in names), sorted(names)


def test_plan_reports_splash_for_tpu(tmp_path):
    out = tmp_path / "plan.json"
    run = subprocess.run([sys.executable, "-m", "nextstep_jax.plan", "--config", str(TINY), "--topology", TOPOLOGY,
                          "--out", str(out), "--program", "loss", "--config.data.image_input=latents",
                          *[f"--config.mesh.{k}={v}" for k, v in SPLASH_MESH.items()]],
                         capture_output=True, text=True, timeout=900, cwd=REPO)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["attention_kernel"] == "splash" and report["fits"] is True
    assert "attention kernel" in run.stdout and "splash" in run.stdout
