"""Resume through the CLI is exact: a run killed with SIGKILL between two checkpoints and started again with the
same command writes, from the restored step on, the same per-step metrics as an uninterrupted run (same data
order, same random numbers). A corrupt newest checkpoint is reported and the previous one is used, again
reproducing the uninterrupted run."""

import signal
import subprocess
import time

from train_runs import REPO, REFERENCE, checkpoint_steps, command, environment, read_metrics, run_train, shared_run

TOTAL, EVERY = 12, 4
ARGS = (f"--config.total_steps={TOTAL}", f"--config.checkpoint.every_steps={EVERY}", "--config.checkpoint.keep=3")
COMPARED = ("loss", "lm_loss", "im_loss", "grad_norm", "lr", "lm_tokens", "image_tokens", "data/documents")


def _same_steps(got: dict, want: dict, steps) -> None:
    for step in steps:
        for key in COMPARED:
            assert got[step][key] == want[step][key], f"step {step} {key}: {got[step][key]} != {want[step][key]}"


def _kill_between_checkpoints(workdir, log):
    """Start the run and SIGKILL it once a checkpoint is complete and a later step is logged."""
    proc = subprocess.Popen(command(workdir, *ARGS), cwd=REPO, env=environment(), stdout=log, stderr=log)
    metrics = workdir / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            saved = checkpoint_steps(workdir)
            if saved and metrics.is_file() and f'"step": {saved[-1] + 1},' in metrics.read_text():
                break
            time.sleep(0.005)
        assert proc.poll() is None, "the run ended before it could be killed"
    finally:
        proc.kill()
        proc.wait()


def test_killed_run_resumes_exactly_and_corrupt_latest_falls_back(tmp_path):
    want = read_metrics(shared_run(*REFERENCE))  # uninterrupted, and longer
    assert set(range(1, TOTAL + 1)) <= set(want)

    workdir = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:
        _kill_between_checkpoints(workdir, log)
    restored, lost = checkpoint_steps(workdir)[-1], max(read_metrics(workdir))
    assert restored < lost < TOTAL, (restored, lost)  # killed between two checkpoints: steps after one are lost

    resumed = run_train(workdir, *ARGS)
    assert f"resuming from step {restored}" in resumed.stderr
    got = read_metrics(workdir)
    assert sorted(got) == list(range(1, TOTAL + 1))  # the killed run's lines after the checkpoint are replaced
    _same_steps(got, want, range(1, TOTAL + 1))

    latest, previous = checkpoint_steps(workdir)[-1], checkpoint_steps(workdir)[-2]
    for f in (workdir / "checkpoints" / str(latest) / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"not a checkpoint")
    again = run_train(workdir, *ARGS)
    assert f"checkpoints/{latest}: unreadable (" in again.stderr and f"using step {previous} instead" in again.stderr
    assert f"resuming from step {previous}" in again.stderr
    got = read_metrics(workdir)
    assert sorted(got) == list(range(1, TOTAL + 1))
    _same_steps(got, want, range(1, TOTAL + 1))
    assert checkpoint_steps(workdir) == [4, 8, 12]


def test_sigterm_saves_the_current_step_and_exits(tmp_path):
    """What a scheduler sends before preempting: the run saves the step it is at (off the checkpoint period)
    and exits cleanly; its steps so far are the uninterrupted run's."""
    want = read_metrics(shared_run(*REFERENCE))
    workdir = tmp_path / "run"
    with open(tmp_path / "run.log", "w") as log:
        proc = subprocess.Popen(command(workdir, *ARGS), cwd=REPO, env=environment(), stdout=log, stderr=log)
        metrics = workdir / "metrics.jsonl"
        try:
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and proc.poll() is None:
                if metrics.is_file() and '"step": 1,' in metrics.read_text():
                    break
                time.sleep(0.005)
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=300) == 0
        finally:
            proc.kill()
    stopped = max(read_metrics(workdir))
    assert stopped < TOTAL and checkpoint_steps(workdir)[-1] == stopped
    assert f"stop requested: saving step {stopped}" in (tmp_path / "run.log").read_text()
    _same_steps(read_metrics(workdir), want, range(1, stopped + 1))
