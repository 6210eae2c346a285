"""``python -m nextstep_jax.demo --miniature``: every stage end to end, resumable, skippable, deterministic.

The miniature runs in subprocesses (SIGTERM must reach a real trainer) that share the trainer tests' persistent
compilation cache, so the second and third runs do not compile again.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import load_file

from nextstep_jax.data.buckets import PIXELS_PER_TOKEN
from nextstep_jax.data.scorer import evaluate
from nextstep_jax.data.shapes import parse_caption
from nextstep_jax.demo.budget import MINIATURE
from nextstep_jax.demo.stages import SPLITS, STAGES, Demo
from tests.train_runs import REPO, environment

# Everything in report.json that a seed fixes: not the timings, the host, the folder.
NOT_FIXED = ("elapsed_s", "this_run_s", "host")


def _command(out: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "nextstep_jax.demo", "--out", str(out), "--miniature", "--no-progress", *extra]


def _run(out: Path, *extra: str, expect: int = 0) -> subprocess.CompletedProcess:
    proc = subprocess.run(_command(out, *extra), cwd=REPO, env=environment(), capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == expect, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def _fixed_numbers(report: dict) -> dict:
    out = {k: v for k, v in report.items() if k not in NOT_FIXED}
    out["model"] = {k: v for k, v in report["model"].items() if k != "folder"}
    out["stages"] = {name: {k: v for k, v in s.items() if k != "wall_s"} for name, s in report["stages"].items()}
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "out"
    _run(out)
    return out


def test_every_stage_writes_its_output(finished):
    demo = Demo(finished, MINIATURE)
    report = json.loads((finished / "report.json").read_text())
    for key in ("geneval", "floor", "ceiling", "originals"):
        for split in SPLITS:
            prompts = demo.prompts(split)
            assert len(prompts) == demo.num_prompts(split) == report["prompts"][split]
            categories = {parse_caption(p).category for p in prompts}
            assert set(report[key][split]) == categories | {"overall"}
            assert report[key][split]["overall"] == pytest.approx(np.mean([report[key][split][c] for c in categories]))
    assert report["originals"]["overall"] == 1.0  # the scorer accepts every ground-truth image
    for key in ("floor", "ceiling"):
        assert report[key]["overall"] == report[key]["eval"]["overall"]
    assert 0.0 <= report["geneval"]["novel"]["overall"] <= 1.0 and np.isfinite(report["vae"]["psnr_db"])
    assert report["elapsed_s"] > 0 and set(report["stages"]) == {s.name for s in STAGES} | {"report"}
    assert report["stages"]["nextstep"]["steps"] == 300 and report["stages"]["floor"]["steps"] == 0
    assert report["stages"]["vae"]["steps"] == 3 and report["stages"]["decoder"]["steps"] == 2

    # The samples: one PNG per prompt with the prompt in its text chunk, scored as the report says.
    for split in SPLITS:
        pngs = sorted((finished / "samples" / "model").glob(f"*_{split}-*.png"))
        prompts = demo.prompts(split)
        images = []
        for path, prompt in zip(pngs, prompts, strict=True):
            with Image.open(path) as im:
                assert im.text["prompt"] == prompt
                images.append(np.asarray(im.convert("RGB")))
        assert evaluate(images, prompts) == report["geneval"][split]

    model = finished / "model"
    for name in ("config.json", "model.safetensors", "tokenizer.model", "sampling.json", "vae/config.json",
                 "vae/checkpoint.safetensors"):
        assert (model / name).is_file(), name
    stored = json.loads((model / "sampling.json").read_text())
    assert tuple(stored["hw"]) == (MINIATURE.image_size,) * 2 and stored["num_steps"] == 2
    assert stored == report["sampling"]
    with Image.open(finished / "grid.png") as grid:
        assert json.loads(grid.text["prompts"]) == (demo.prompts("eval")[:MINIATURE.grid_eval]
                                                    + demo.prompts("novel")[:MINIATURE.grid_novel])
    # The model's tokenizer: the trained encoder, bit for bit (the latents were cached with it), and the decoder
    # the decoder stage fine-tuned.
    trained, shipped = (load_file(f / "checkpoint.safetensors") for f in (finished / "vae" / "release", model / "vae"))
    assert trained.keys() == shipped.keys()
    assert all(np.array_equal(trained[k], shipped[k]) for k in trained if k.startswith("encoder."))
    assert any(not np.array_equal(trained[k], shipped[k]) for k in trained if k.startswith("decoder."))
    for name in ("report.md", "curves_nextstep.png", "curves_vae.png", "curves_decoder.png"):
        assert (finished / name).stat().st_size > 0


def test_the_sample_cli_reproduces_a_demo_image(finished, tmp_path):
    sidecar = sorted((finished / "samples" / "model").glob("*_novel-*.json"))[0]
    record = json.loads(sidecar.read_text())
    proc = subprocess.run([sys.executable, "-m", "nextstep_jax.sample", "--model", str(finished / "model"),
                           "--prompt", record["prompt"], "--seed", str(record["seed"]), "--out", str(tmp_path),
                           "--no-progress"], cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    written = Path(proc.stdout.split()[0])
    assert json.loads(written.with_suffix(".json").read_text()) == record  # the model's stored settings
    with Image.open(written) as a, Image.open(sidecar.with_suffix(".png")) as b:
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_a_finished_demo_is_skipped(finished):
    before = (finished / "report.json").read_bytes()
    proc = _run(finished)
    for name in [s.name for s in STAGES] + ["report"]:
        assert f"[{name}] complete, skipped" in proc.stderr
    assert (finished / "report.json").read_bytes() == before


def test_an_interrupted_demo_resumes_to_the_same_report(finished, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.Popen(_command(out), cwd=REPO, env=environment(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    in_nextstep = False
    for line in proc.stderr:
        in_nextstep = in_nextstep or line.startswith("[nextstep] running")
        if in_nextstep and line.startswith("compiled the train step"):
            proc.send_signal(signal.SIGTERM)  # the trainer saves where it is and stops
            break
    _, rest = proc.communicate(timeout=600)
    assert proc.returncode == 1 and "stopped at step" in rest, rest
    assert not (out / "model").exists() and not (out / "report.json").exists()

    resumed = _run(out)
    for name in ("tokenizer", "vae", "decoder", "latents"):
        assert f"[{name}] complete, skipped" in resumed.stderr
    assert "resuming from step" in resumed.stderr
    report = json.loads((out / "report.json").read_text())
    assert _fixed_numbers(report) == _fixed_numbers(json.loads((finished / "report.json").read_text()))


def test_a_folder_of_other_settings_is_refused(finished):
    proc = _run(finished, "--seed", "1", expect=2)
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: --out {finished}: made with other settings")


def test_drift_probe_with_every_token_given_scores_the_ceiling(finished):
    """``scripts/drift_probe.py``: with all image tokens the VAE's own, nothing is drawn and the images are the
    VAE's reconstructions, so the score is the report's ceiling for the same prompts; the other measurements are
    scores too. Of several free-running draws the first is the ``--given 0`` one, at least one draw is right at
    least as often as any single draw, and a pick of one draw per prompt is right at most that often."""
    demo = Demo(finished, MINIATURE)
    report = json.loads((finished / "report.json").read_text())
    proc = subprocess.run([sys.executable, "scripts/drift_probe.py", "--model", str(finished / "model"),
                           "--prompts", str(demo.num_prompts("eval")), "--given", "0,1000", "--teacher-forced",
                           "--token-noise", "0,0.5", "--candidates", "2"],
                          cwd=REPO, env=environment(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    lines = [json.loads(line) for line in proc.stdout.splitlines()]
    *lines, best_of = lines
    assert [line.get("given") for line in lines] == [0, 1000] + [None] * 5 and lines[2]["teacher_forced"]
    assert [line.get("token_noise") for line in lines[3:5]] == [0.0, 0.5]
    assert [line.get("candidate") for line in lines[5:]] == [0, 1] and best_of["candidates"] == 2
    assert lines[5]["mini_geneval"] == lines[0]["mini_geneval"]
    assert max(line["mini_geneval"] for line in lines[5:]) <= best_of["any_right"] <= 1.0
    assert set(best_of["best_of"]) == {"caption_error", "caption_evidence", "cycle", "cycle_worst"}
    assert all(0.0 <= picked <= best_of["any_right"] for picked in best_of["best_of"].values())
    tokens = lines[0]["drawn"]
    assert tokens == (MINIATURE.image_size // PIXELS_PER_TOKEN) ** 2 and lines[1]["drawn"] == 0
    for unchanged in (lines[1], lines[3]):  # every token the VAE's own, noise 0: the reconstructions
        assert unchanged["mini_geneval"] == pytest.approx(report["ceiling"]["eval"]["overall"], abs=1e-4)
    assert all(0.0 <= line["mini_geneval"] <= 1.0 for line in lines)
