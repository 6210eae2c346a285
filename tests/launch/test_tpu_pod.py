"""launch/tpu_pod.py: the exact dry-run script, the same script run against a fake gcloud (the remote commands
then executed in a sandbox home, where a fake python records what the trainer would get), bad input, and the
libtpu flags against the installed libtpu."""

import importlib.util
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FLAGS = ("--xla_tpu_enable_async_collective_fusion=true --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true "
         "--xla_tpu_enable_async_collective_fusion_multiple_steps=true --xla_tpu_overlap_compute_collective_tc=true "
         "--xla_enable_async_all_gather=true --xla_tpu_enable_data_parallel_all_reduce_opt=true "
         "--xla_tpu_data_parallel_opt_different_sized_ops=true --xla_tpu_megacore_fusion_allow_ags=false")
BASE = ["--name", "ns14b", "--zone", "us-east5-a", "--accelerator-type", "v5p-128"]
TRAIN = ["--config", "configs/14b.py", "--workdir", "/mnt/runs/14 b", "--config.total_steps=10"]


def _q(s):
    return shlex.quote(s)


def test_dry_run_all_is_the_exact_script(run_launcher):
    run = run_launcher("tpu_pod.py", ["all", *BASE, "--project", "proj", "--spot", *TRAIN, "--dry-run"])
    assert run.returncode == 0, run.stderr
    g = "--zone=us-east5-a --project=proj"
    setup = ("set -e; command -v python3.11 >/dev/null || (sudo apt-get update -q && sudo apt-get install -y -q "
             "python3.11 python3.11-venv); rm -rf ~/nextstep_jax && mkdir -p ~/nextstep_jax && tar -xzf "
             "~/nextstep_jax.tar.gz -C ~/nextstep_jax; python3.11 -m venv ~/nextstep_venv; ~/nextstep_venv/bin/pip "
             "install -q -r ~/nextstep_jax/requirements-tpu.txt; ~/nextstep_venv/bin/pip install -q --no-deps -e "
             "~/nextstep_jax")
    train = (f"export LIBTPU_INIT_ARGS={_q(FLAGS)} NEXTSTEP_DISTRIBUTED=auto; cd ~/nextstep_jax && setsid nohup "
             "~/nextstep_venv/bin/python -m nextstep_jax.train --config=configs/14b.py '--workdir=/mnt/runs/14 b' "
             "--config.total_steps=10 > ~/nextstep_train.log 2>&1 < /dev/null &")
    expected = [
        "# nextstep_jax all: 1 x v5p-128 (64 chips, 16 hosts per slice)",
        "set -euo pipefail",
        f"gcloud compute tpus queued-resources create ns14b {g} --accelerator-type=v5p-128 "
        "--runtime-version=v2-alpha-tpuv5 --node-id=ns14b --spot",
        f"while :; do s=$(gcloud compute tpus queued-resources describe ns14b {g} --format='value(state.state)'); "
        "[ \"$s\" = ACTIVE ] && break; case \"$s\" in FAILED|SUSPENDED) echo \"queued resource ns14b is $s\" >&2; "
        "exit 1;; esac; sleep 60; done",
        f"git -C {REPO} archive --format=tar.gz --output=/tmp/nextstep_jax.tar.gz HEAD",
        f"gcloud compute tpus tpu-vm scp /tmp/nextstep_jax.tar.gz ns14b:nextstep_jax.tar.gz {g} --worker=all",
        f"gcloud compute tpus tpu-vm ssh ns14b {g} --worker=all --command={_q(setup)}",
        f"gcloud compute tpus tpu-vm ssh ns14b {g} --worker=all --command={_q(train)}",
    ]
    assert run.stdout.splitlines() == expected


@pytest.mark.parametrize("kind, chips, hosts, runtime", [
    ("v5p-8", 4, 1, "v2-alpha-tpuv5"), ("v5litepod-8", 8, 1, "v2-alpha-tpuv5-lite"),
    ("v5litepod-256", 256, 64, "v2-alpha-tpuv5-lite"), ("v6e-256", 256, 64, "v2-alpha-tpuv6e"),
    ("v4-32", 16, 4, "tpu-ubuntu2204-base")])
def test_accelerator_types_count_chips_and_hosts(kind, chips, hosts, runtime, run_launcher):
    run = run_launcher("tpu_pod.py", ["create", "--name", "a", "--zone", "z", "--accelerator-type", kind,
                                      "--dry-run"])
    assert run.returncode == 0, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == (f"# nextstep_jax create: 1 x {kind} ({chips} chips, {hosts} host{'s' if hosts > 1 else ''} "
                        "per slice)")
    assert f"--runtime-version={runtime}" in lines[2]


def _remote_home(tmp_path):
    """A home with the shipped repository and a venv whose python records its arguments and environment."""
    home = tmp_path / "home"
    (home / "nextstep_jax").mkdir(parents=True)
    (home / "nextstep_venv" / "bin").mkdir(parents=True)
    python = home / "nextstep_venv" / "bin" / "python"
    python.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                      "keep = ('LIBTPU_INIT_ARGS', 'NEXTSTEP_DISTRIBUTED', 'EXTRA', 'MEGASCALE_COORDINATOR_ADDRESS',"
                      " 'MEGASCALE_NUM_SLICES', 'MEGASCALE_SLICE_ID', 'MEGASCALE_PORT')\n"
                      "out = {'argv': sys.argv[1:], 'cwd': os.getcwd(), "
                      "'env': {k: os.environ[k] for k in keep if k in os.environ}}\n"
                      "open(os.path.expanduser('~/record.json'), 'w').write(json.dumps(out))\n")
    python.chmod(0o755)
    return home


def _run_remote(command: str, home, extra_env=None) -> dict:
    record = home / "record.json"
    record.unlink(missing_ok=True)
    env = {"HOME": str(home), "PATH": os.environ["PATH"]} | (extra_env or {})
    subprocess.run(["bash", "-c", command], env=env, check=True, timeout=30)
    for _ in range(200):  # the trainer starts in the background
        if record.exists() and record.read_text():
            return json.loads(record.read_text())
        time.sleep(0.05)
    raise AssertionError(f"the remote command did not start the trainer: {command}")


def test_multislice_train_runs_every_slice_with_megascale_env(tmp_path, fakes, run_launcher):
    env, calls = fakes
    env["FAKE_DESCRIBE"] = "10.1.2.3"
    run = run_launcher("tpu_pod.py", ["train", *BASE, "--slices", "2", "--env", "EXTRA=a b", *TRAIN], env=env)
    assert run.returncode == 0, run.stderr
    made = calls()
    assert made[0] == ["gcloud", "compute", "tpus", "tpu-vm", "describe", "ns14b-0", "--zone=us-east5-a",
                       "--format=value(networkEndpoints[0].ipAddress)"]
    ssh = sorted((c for c in made if c[4] == "ssh"), key=lambda c: c[5])
    assert [c[5] for c in ssh] == ["ns14b-0", "ns14b-1"]
    home = _remote_home(tmp_path)
    for slice_id, call in enumerate(ssh):
        assert call[6:8] == ["--zone=us-east5-a", "--worker=all"]
        record = _run_remote(call[8].removeprefix("--command="), home)
        assert record["cwd"] == str(home / "nextstep_jax")
        assert record["argv"] == ["-m", "nextstep_jax.train", "--config=configs/14b.py", "--workdir=/mnt/runs/14 b",
                                  "--config.mesh.data=2", "--config.mesh.fsdp=-1", "--config.total_steps=10"]
        assert record["env"] == {"LIBTPU_INIT_ARGS": FLAGS, "NEXTSTEP_DISTRIBUTED": "auto", "EXTRA": "a b",
                                 "MEGASCALE_COORDINATOR_ADDRESS": "10.1.2.3:8080", "MEGASCALE_NUM_SLICES": "2",
                                 "MEGASCALE_SLICE_ID": str(slice_id), "MEGASCALE_PORT": "8080"}


def test_a_failed_slice_fails_the_multislice_train(fakes, run_launcher):
    env, calls = fakes
    env.update(FAKE_DESCRIBE="10.1.2.3", FAKE_FAIL="ns14b-1")
    run = run_launcher("tpu_pod.py", ["train", *BASE, "--slices", "2", *TRAIN], env=env)
    assert run.returncode == 3
    assert sorted(c[5] for c in calls() if c[4] == "ssh") == ["ns14b-0", "ns14b-1"]


def test_single_host_slice_gets_no_distributed_env_and_mesh_overrides_stay(tmp_path, fakes, run_launcher):
    env, calls = fakes
    run = run_launcher("tpu_pod.py", ["train", "--name", "one", "--zone", "z", "--accelerator-type", "v6e-8",
                                      "--config", "configs/14b.py", "--workdir", "/w", "--config.mesh.fsdp=8"], env=env)
    assert run.returncode == 0, run.stderr
    (call,) = calls()
    record = _run_remote(call[-1].removeprefix("--command="), _remote_home(tmp_path))
    assert record["env"] == {"LIBTPU_INIT_ARGS": FLAGS}
    assert record["argv"][2:] == ["--config=configs/14b.py", "--workdir=/w", "--config.mesh.fsdp=8"]


@pytest.mark.parametrize("state, rc", [("ACTIVE", 0), ("FAILED", 1)])
def test_create_waits_for_the_queued_resource(fakes, state, rc, run_launcher):
    env, calls = fakes
    env["FAKE_DESCRIBE"] = state
    run = run_launcher("tpu_pod.py", ["create", *BASE, "--slices", "3"], env=env)
    assert run.returncode == rc, run.stderr
    made = calls()
    assert made[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "ns14b", "--zone=us-east5-a",
                       "--accelerator-type=v5p-128", "--runtime-version=v2-alpha-tpuv5", "--node-count=3",
                       "--node-prefix=ns14b"]
    assert made[1][3:5] == ["queued-resources", "describe"] and len(made) == 2
    assert (f"queued resource ns14b is {state}" in run.stderr) == (rc == 1)


def test_delete_and_logs(fakes, run_launcher):
    env, calls = fakes
    assert run_launcher("tpu_pod.py", ["delete", *BASE], env=env).returncode == 0
    assert run_launcher("tpu_pod.py", ["logs", *BASE, "--slices", "2"], env=env).returncode == 0
    assert calls() == [
        ["gcloud", "compute", "tpus", "queued-resources", "delete", "ns14b", "--zone=us-east5-a", "--force", "--quiet"],
        ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "ns14b-0", "--zone=us-east5-a", "--worker=0",
         "--command=tail -n 100 ~/nextstep_train.log"]]


@pytest.mark.parametrize("args, culprit", [
    (["create", "--name", "a", "--zone", "z", "--accelerator-type", "v5e-256"], "--accelerator-type 'v5e-256'"),
    (["create", "--name", "a", "--zone", "z", "--accelerator-type", "v5p-7"], "--accelerator-type 'v5p-7'"),
    (["create", "--name", "Bad_Name", "--zone", "z", "--accelerator-type", "v5p-8"], "--name 'Bad_Name'"),
    (["create", *BASE, "--slices", "0"], "--slices 0"),
    (["create", *BASE, "--config.total_steps=1"], "create: --config"),
    (["train", *BASE, "--workdir", "/w"], "--config is required"),
    (["train", *BASE, "--config", "configs/nope.py", "--workdir", "/w"], "--config configs/nope.py"),
    (["train", *BASE, *TRAIN, "--env", "NOEQUALS"], "--env 'NOEQUALS'"),
    (["train", *BASE, *TRAIN, "--bogus"], "'--bogus'"),
])
def test_bad_input_exits_2_naming_the_flag_and_runs_nothing(fakes, args, culprit, run_launcher):
    env, calls = fakes
    run = run_launcher("tpu_pod.py", args, env=env)
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and culprit in run.stderr, run.stderr
    assert run.stdout == "" and calls() == []


LIBTPU_CHECK = """
import jax, jax.numpy as jnp, numpy as np
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec
devices = topologies.get_topology_desc(platform="tpu", topology_name="v5p:2x2x1").devices
x = jax.ShapeDtypeStruct((256, 256), jnp.float32, sharding=NamedSharding(Mesh(np.array(devices), ("x",)),
                                                                          PartitionSpec("x")))
jax.jit(lambda a: (a @ a.T).sum()).lower(x).compile()
print("compiled")
"""


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="no TPU runtime (requirements-tpu.txt)")
@pytest.mark.parametrize("extra, accepted", [((), True), (("--xla_not_a_libtpu_flag=true",), False)])
def test_libtpu_accepts_the_launch_flags(extra, accepted):
    env = dict(os.environ, LIBTPU_INIT_ARGS=" ".join((FLAGS, *extra)), ALLOW_MULTIPLE_LIBTPU_LOAD="1")
    run = subprocess.run([sys.executable, "-c", LIBTPU_CHECK], capture_output=True, text=True, env=env, timeout=300,
                         cwd=REPO)
    assert ("compiled" in run.stdout) == accepted, run.stderr[-2000:]
    if not accepted:
        assert "xla_not_a_libtpu_flag" in run.stderr
