"""launch/gpu_slurm.py: the exact sbatch script of a dry run, the written script run with a fake srun (what the
trainer would get), bad input, the XLA flags against the installed jaxlib, and training/distributed.py choosing
JAX's own cluster detection under the SLURM variables srun sets."""

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from nextstep_jax.training import distributed

REPO = Path(__file__).resolve().parents[2]
FLAGS = ("--xla_gpu_enable_latency_hiding_scheduler=true --xla_gpu_all_reduce_combine_threshold_bytes=134217728 "
         "--xla_gpu_all_gather_combine_threshold_bytes=134217728 "
         "--xla_gpu_reduce_scatter_combine_threshold_bytes=134217728 --xla_gpu_enable_pipelined_all_gather=true "
         "--xla_gpu_enable_pipelined_reduce_scatter=true --xla_gpu_enable_pipelined_all_reduce=true "
         "--xla_gpu_enable_while_loop_double_buffering=true")


@pytest.fixture
def venv(tmp_path):
    path = tmp_path / "venv"
    (path / "bin").mkdir(parents=True)
    (path / "bin" / "python").touch()
    return path


def _args(venv, *extra):
    return ["--nodes", "2", "--gpus-per-node", "8", "--venv", str(venv), "--config", "configs/14b.py",
            "--workdir", "/shared/runs/14 b", *extra]


def test_dry_run_per_gpu_is_the_exact_script(venv, run_launcher, tmp_path):
    run = run_launcher("gpu_slurm.py", _args(venv, "--partition", "gpu", "--account", "proj", "--time", "2-00:00:00",
                                             "--cpus-per-task", "12", "--config.total_steps=10", "--dry-run"))
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines() == [
        "#!/bin/bash",
        "# nextstep_jax: 2 node(s) x 8 GPU(s), one process per gpu",
        "#SBATCH --job-name=nextstep", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=8",
        "#SBATCH --gpus-per-node=8", "#SBATCH --exclusive", "#SBATCH --output=%x-%j.out",
        "#SBATCH --partition=gpu", "#SBATCH --account=proj", "#SBATCH --time=2-00:00:00",
        "#SBATCH --cpus-per-task=12",
        "set -euo pipefail",
        f"export XLA_FLAGS={shlex.quote(FLAGS)}",
        "export XLA_PYTHON_CLIENT_MEM_FRACTION=0.90",
        f"cd {REPO}",
        f"srun --kill-on-bad-exit=1 --gpu-bind=none {venv}/bin/python -m nextstep_jax.train --config=configs/14b.py "
        "'--workdir=/shared/runs/14 b' --config.total_steps=10",
        "# then: sbatch nextstep.sbatch",
    ]
    assert not (REPO / "nextstep.sbatch").exists() and not list(tmp_path.glob("*.sbatch"))


@pytest.mark.parametrize("per, tasks, local_ids, bind", [("gpu", "8", None, ["--gpu-bind=none"]),
                                                         ("host", "1", "0,1,2,3,4,5,6,7", [])])
def test_submitted_script_runs_the_trainer(tmp_path, fakes, venv, run_launcher, per, tasks, local_ids, bind):
    env, calls = fakes
    script = tmp_path / "job.sbatch"
    run = run_launcher("gpu_slurm.py", _args(venv, "--per", per, "--script", str(script), "--env", "NCCL_DEBUG=WARN"),
                       env=env)
    assert run.returncode == 0, run.stderr
    assert calls() == [["sbatch", str(script)]]
    text = script.read_text()
    assert f"#SBATCH --ntasks-per-node={tasks}" in text.splitlines()
    # What sbatch would run: the fake srun records its arguments; the script's environment is checked with env.
    check = tmp_path / "env.json"
    names = ("XLA_FLAGS", "XLA_PYTHON_CLIENT_MEM_FRACTION", "JAX_LOCAL_DEVICE_IDS", "NCCL_DEBUG")
    probe = shlex.join([sys.executable, "-c", f"import json, os; json.dump({{k: os.environ.get(k) for k in {names}}}, "
                                              f"open({str(check)!r}, 'w'))"])
    subprocess.run(["bash", "-c", text.replace("\nsrun ", f"\n{probe}\nsrun ")], env=env, check=True, timeout=30)
    assert json.loads(check.read_text()) == {"XLA_FLAGS": FLAGS, "XLA_PYTHON_CLIENT_MEM_FRACTION": "0.90",
                                             "JAX_LOCAL_DEVICE_IDS": local_ids, "NCCL_DEBUG": "WARN"}
    assert calls()[1] == ["srun", "--kill-on-bad-exit=1", *bind, f"{venv}/bin/python", "-m", "nextstep_jax.train",
                          "--config=configs/14b.py", "--workdir=/shared/runs/14 b"]


@pytest.mark.parametrize("extra, culprit", [
    (["--nodes", "0"], "--nodes 0"),
    (["--gpus-per-node", "0"], "--gpus-per-node 0"),
    (["--config", "configs/missing.py"], "--config configs/missing.py"),
    (["--time", "two days"], "--time 'two days'"),
    (["--partition", "a b"], "--partition 'a b'"),
    (["--env", "=x"], "--env '=x'"),
    (["--bogus"], "'--bogus'"),
])
def test_bad_input_exits_2_naming_the_flag(tmp_path, fakes, venv, run_launcher, extra, culprit):
    env, calls = fakes
    script = tmp_path / "job.sbatch"
    run = run_launcher("gpu_slurm.py", _args(venv, "--script", str(script)) + extra, env=env)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and culprit in run.stderr, run.stderr
    assert not script.exists() and calls() == []


def test_missing_venv_is_refused(tmp_path, run_launcher):
    run = run_launcher("gpu_slurm.py", _args(tmp_path / "nowhere"))
    assert run.returncode == 2 and f"--venv {tmp_path / 'nowhere'}: no bin/python" in run.stderr


@pytest.mark.parametrize("flags, accepted", [(FLAGS, True), (FLAGS + " --xla_gpu_not_a_flag=true", False)])
def test_installed_jaxlib_parses_the_xla_flags(flags, accepted):
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-c", "import jax; print(len(jax.devices()))"], capture_output=True,
                         text=True, env=env, timeout=120)
    assert (run.returncode == 0) == accepted, run.stderr[-2000:]


def test_distributed_uses_jax_cluster_detection_under_srun():
    """srun's variables for a 2-task step: auto (JAX's SlurmCluster); one task: a single process."""
    srun = {"SLURM_JOB_ID": "4242", "SLURM_NTASKS": "16", "SLURM_PROCID": "3", "SLURM_LOCALID": "3",
            "SLURM_STEP_NODELIST": "gpu[001-002]"}
    assert distributed.resolve(env=srun).mode == "auto"
    assert distributed.resolve(env=srun | {"SLURM_NTASKS": "1"}).mode == "single"
