"""The CLI on 8 fake CPU devices (data x fsdp x tensor = 2 x 2 x 2) gives the per-step metrics of one device for
several steps; a mesh the config does not fit is refused before anything compiles, with nothing written."""

import math
import subprocess

from nextstep_jax.configs import load_config_file
from train_runs import REFERENCE, REPO, command, environment, read_metrics, run_train, shared_run

STEPS = 4
MESH = ("--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2")
# Summation order differs between one device and 8 shards (float32): measured differences are ~3e-7 relative
# over these steps; AdamW's first steps divide by the gradient's own magnitude, which can amplify them.
RTOL = 5e-6


def test_eight_devices_match_one_device(tmp_path):
    one = read_metrics(shared_run(*REFERENCE))  # one device, more steps
    run_train(tmp_path / "eight", f"--config.total_steps={STEPS}", *MESH, devices=8)
    eight = read_metrics(tmp_path / "eight")
    assert sorted(eight) == list(range(1, STEPS + 1))
    for step in eight:
        for key in ("lm_tokens", "image_tokens", "data/documents"):  # the same global batch
            assert eight[step][key] == one[step][key], (step, key)
        for key in ("loss", "lm_loss", "im_loss", "grad_norm"):
            assert math.isclose(eight[step][key], one[step][key], rel_tol=RTOL), (step, key, eight[step][key],
                                                                                    one[step][key])
    assert one[STEPS]["loss"] != one[1]["loss"]  # the steps did train


def test_config_that_does_not_fit_the_mesh_is_refused_before_compiling(tmp_path):
    workdir = tmp_path / "run"
    proc = subprocess.run(command(workdir, "--config.mesh.fsdp=1", "--config.mesh.tensor=8"), cwd=REPO,
                          env=environment(8, JAX_LOG_COMPILES="1"), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    heads = load_config_file(REPO / "configs" / "tiny.py").model.num_heads
    assert heads % 8, "the tiny model must have a head count that 8 does not divide"
    lines = proc.stderr.strip().splitlines()
    assert lines == [f"error: model.num_heads={heads} is not divisible by mesh axis tensor=8 (logical axis 'heads'); "
                     "change the mesh or the config"], proc.stderr
    assert not workdir.exists()
