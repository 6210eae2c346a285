"""Two real processes on this machine (jax.distributed over gloo, 4 fake CPU devices each: one 8-device mesh)
train the tiny config through the CLI, each on its own shard of the data, with one writer of the metrics; a
run restarted from its previous checkpoint repeats the uninterrupted two-process run exactly."""

import shutil
import socket
import subprocess

from train_runs import REPO, checkpoint_steps, command, environment, read_metrics

TOTAL, EVERY = 2, 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _train_two_processes(workdir, log_dir):
    port = _free_port()
    procs = []
    for i in range(2):
        log = open(log_dir / f"process{i}.log", "w")
        args = command(workdir, f"--config.total_steps={TOTAL}", f"--config.checkpoint.every_steps={EVERY}",
                       "--config.checkpoint.keep=5", "--coordinator", f"127.0.0.1:{port}", "--num_processes", "2",
                       "--process_id", str(i))
        procs.append((subprocess.Popen(args, cwd=REPO, env=environment(4), stdout=log, stderr=log), log))
    logs = []
    for proc, log in procs:
        try:
            proc.wait(timeout=600)
        finally:
            proc.kill()
            log.close()
        logs.append(open(log.name).read())
        assert proc.returncode == 0, logs[-1][-3000:]
    return logs


def test_two_processes_train_checkpoint_and_resume(tmp_path):
    first = tmp_path / "run"
    logs = _train_two_processes(first, tmp_path)
    want = read_metrics(first)
    assert sorted(want) == list(range(1, TOTAL + 1))
    assert checkpoint_steps(first) == list(range(EVERY, TOTAL + 1, EVERY))
    assert "compiled the train step" in logs[0] and "compiled the train step" not in logs[1]  # one writer
    assert all(want[s]["data/documents"] > want[s - 1]["data/documents"] for s in range(2, TOTAL + 1))

    again = tmp_path / "again"
    shutil.copytree(first, again)
    shutil.rmtree(again / "checkpoints" / str(TOTAL))
    logs = _train_two_processes(again, tmp_path)
    assert f"resuming from step {TOTAL - EVERY}" in logs[0]
    got = read_metrics(again)
    assert sorted(got) == list(range(1, TOTAL + 1))
    for step in range(1, TOTAL + 1):
        for key in ("loss", "lm_loss", "im_loss", "grad_norm", "data/documents"):
            assert got[step][key] == want[step][key], (step, key)
