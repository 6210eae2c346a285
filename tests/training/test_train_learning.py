"""The trainer learns: the tiny config overfits one fixed batch (the loss falls by a large factor), and a short CLI
run on the built-in shapes data lowers the flow-matching loss, whose learning curves scripts/plot_metrics.py
draws from the run's metrics.jsonl."""

import subprocess
import sys

import numpy as np
from PIL import Image

from nextstep_jax import configs, train
from nextstep_jax.training import nextstep_task
from nextstep_jax.training.run_config import resolve_config
from nextstep_jax.training.state import init_train_state
from nextstep_jax.training.step import make_train_step
from train_runs import REFERENCE, REPO, SMALL, read_metrics, shared_run

OVERFIT_STEPS = 150


def test_tiny_config_overfits_one_batch(tmp_path):
    argv = ["--config", str(REPO / "configs" / "tiny.py"), "--workdir", str(tmp_path / "run"), *SMALL,
            "--config.schedule.peak_lr=1e-2", "--config.schedule.warmup_steps=10"]
    args, overrides = configs.parse_args(train.parser(), argv)
    run = nextstep_task.prepare(resolve_config(args, overrides, train.TASKS), args)
    config = run.config
    state = init_train_state(config.model, run.optimizer, run.mesh, seed=config.seed, params=run.initial_params)
    step = make_train_step(config, run.model, run.optimizer, run.mesh, vae=run.vae)
    batch = next(run.data)
    history = []
    for _ in range(OVERFIT_STEPS):
        state, metrics = step(state, batch, run.vae_params)
        history.append({k: float(v) for k, v in metrics.items()})
    first, last = history[0], {k: np.mean([h[k] for h in history[-10:]]) for k in history[0]}
    assert last["loss"] < first["loss"] / 5, (first["loss"], last["loss"])
    assert last["lm_loss"] < first["lm_loss"] / 20, (first["lm_loss"], last["lm_loss"])  # captions memorised
    assert last["im_loss"] < first["im_loss"] / 4, (first["im_loss"], last["im_loss"])
    assert not any(h["nonfinite"] for h in history)


def test_short_shapes_run_lowers_the_flow_matching_loss_and_plots(tmp_path):
    workdir = shared_run(*REFERENCE)
    metrics = read_metrics(workdir)
    im_loss = np.array([metrics[s]["im_loss"] for s in sorted(metrics)])
    lm_loss = np.array([metrics[s]["lm_loss"] for s in sorted(metrics)])
    # Per-step noise of im_loss is ~0.02 (fresh t and noise every step); the fall over the run is ~0.2.
    assert im_loss[-10:].mean() < im_loss[:10].mean() - 0.1, im_loss
    assert lm_loss[-10:].mean() < lm_loss[:10].mean() / 1.5, lm_loss
    out = tmp_path / "curves.png"
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "plot_metrics.py"), str(workdir / "metrics.jsonl"),
                           "-o", str(out), "--keys", "loss,lm_loss,im_loss", "--smooth", "5"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    with Image.open(out) as image:
        assert image.format == "PNG" and image.width > 100 and image.height > 3 * 100
        pixels = np.asarray(image.convert("L"))
    assert (pixels < 128).mean() > 0.005  # axes, labels and curves drawn, not a blank canvas
