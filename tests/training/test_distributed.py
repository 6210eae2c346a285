"""Multi-host start-up: where the settings come from, the errors that name what is missing, and two real
processes (gloo, 4 fake devices each) forming one 8-device job with a correct cross-process reduction."""

import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from nextstep_jax.training.distributed import Settings, resolve
from train_runs import environment

SCRIPT = Path(__file__).with_name("distributed_process.py")


def test_settings_precedence_and_detection():
    env = {"NEXTSTEP_COORDINATOR": "10.0.0.1:1234", "NEXTSTEP_NUM_PROCESSES": "4", "NEXTSTEP_PROCESS_ID": "2"}
    assert resolve(env={}) == Settings("single")
    assert resolve(env=env) == Settings("explicit", "10.0.0.1:1234", 4, 2)
    assert resolve("h:1", 2, 0, env=env) == Settings("explicit", "h:1", 2, 0)
    assert resolve("h:1", 1, 0, env={}) == Settings("single")
    assert resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}).mode == "auto"
    assert resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}).mode == "single"
    assert resolve(env={"OMPI_COMM_WORLD_SIZE": "2"}).mode == "auto"
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "t0,t1,t2,t3"}).mode == "auto"
    assert resolve(env={"TPU_WORKER_HOSTNAMES": "localhost"}).mode == "single"
    assert resolve(env={"NEXTSTEP_DISTRIBUTED": "auto"}).mode == "auto"


@pytest.mark.parametrize("args, env, message", [
    ((None, None, None), {"NEXTSTEP_COORDINATOR": "h:1"}, "num_processes, process_id not set"),
    (("h:1", 2, 2), {}, r"process_id 2 is not in \[0, num_processes=2\)"),
    (("h", 2, 0), {}, "coordinator 'h' is not host:port"),
    ((None, None, None), {"NEXTSTEP_COORDINATOR": "h:1", "NEXTSTEP_NUM_PROCESSES": "two",
                          "NEXTSTEP_PROCESS_ID": "0"}, "NEXTSTEP_NUM_PROCESSES='two' is not an integer"),
])
def test_bad_settings_are_named(args, env, message):
    with pytest.raises(ValueError, match=message):
        resolve(*args, env=env)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_reduce_across_hosts():
    port = _free_port()
    base = environment(4, NEXTSTEP_COORDINATOR=f"127.0.0.1:{port}", NEXTSTEP_NUM_PROCESSES="2")
    procs = [subprocess.Popen([sys.executable, str(SCRIPT)], env={**base, "NEXTSTEP_PROCESS_ID": str(i)},
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))
    assert sorted(o["process"] for o in outputs) == [0, 1]
    expected = float(sum(3 * (r + 1) ** 2 for r in range(8)))
    for o in outputs:
        assert o["mode"] == "explicit" and o["processes"] == 2
        assert o["devices"] == 8 and o["local_devices"] == 4
        assert o["sum_of_squares"] == expected
