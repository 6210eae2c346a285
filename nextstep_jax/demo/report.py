"""The demo's last stage: score the samples with the mini GenEval (``data.scorer``) beside the floor (the
untrained model), the ceiling (the VAE's reconstructions of the same held-out images) and those images
themselves, and write ``report.json``, ``report.md``, a labelled grid and the learning curves."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from nextstep_jax.demo.stages import CONFIGS, MODELS, SPLITS, Demo, sample_files
from nextstep_jax.io.atomic import write_file

REPORT_JSON, REPORT_MD, GRID_PNG = "report.json", "report.md", "grid.png"
CURVES = {"nextstep": ("curves_nextstep.png", "loss,im_loss,lm_loss,grad_norm"),
          "vae": ("curves_vae.png", "loss,eval/psnr_db,eval/geneval"), "decoder": ("curves_decoder.png", "loss")}
PASS, MISS = (40, 160, 60), (210, 40, 40)  # tile borders in the grid: the caption's claims hold / do not


def held_out(demo: Demo) -> dict[str, tuple[np.ndarray, list[str]]]:
    """split -> (its first images, uint8 [N, S, S, 3], and their captions: the prompts)."""
    from nextstep_jax.data.image_pipeline import held_out_images

    return {s: held_out_images(demo.held_out_spec(s), demo.num_prompts(s), demo.budget.image_size) for s in SPLITS}


def reconstructions(demo: Demo, images: np.ndarray, split: str) -> np.ndarray:
    """The demo VAE's reconstructions (posterior mean, no noise; the fine-tuned decoder) of ``images``, through
    the VAE trainer's own held-out evaluation."""
    import ml_collections

    from nextstep_jax.checkpoint import load_vae
    from nextstep_jax.configs import mesh_config
    from nextstep_jax.sharding import make_mesh
    from nextstep_jax.training.vae_task import VaeEvaluator, vae_eval_config

    vae_cfg, params = load_vae(demo.vae)
    config = ml_collections.ConfigDict(dict(
        vae=vae_cfg, data=dict(image_size=demo.budget.image_size), total_steps=0,
        eval=vae_eval_config(dataset=dataclasses.asdict(demo.held_out_spec(split)), num_images=len(images),
                             batch_size=min(50, len(images)))))
    evaluator = VaeEvaluator(config, make_mesh(dict(mesh_config())), demo.vae_workdir)
    if not np.array_equal(evaluator.images, images):
        raise AssertionError("the VAE evaluator's held-out images differ from the demo's")
    return evaluator.reconstruct(params)[0]


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def score(demo: Demo) -> dict:
    """Every mini-GenEval figure of the report, per split and category, plus the per-image results."""
    from nextstep_jax.data.scorer import evaluate, score as passes
    from nextstep_jax.training.image_metrics import psnr

    originals = held_out(demo)
    out = {"geneval": {}, "floor": {}, "ceiling": {}, "originals": {}, "vae": {}, "passed": {}}
    for which in MODELS:
        for split, paths in sample_files(demo, which).items():
            captions = originals[split][1]
            images = [read_png(p) for p in paths]
            prompts = [json.loads(p.with_suffix(".json").read_text())["prompt"] for p in paths]
            if prompts != captions:
                raise AssertionError(f"{demo.samples(which)}: samples do not match the {split} prompts")
            out["geneval" if which == "model" else "floor"][split] = evaluate(images, captions)
            if which == "model":
                out["passed"][split] = [bool(passes(im, c)) for im, c in zip(images, captions)]
    for split, (images, captions) in originals.items():
        recon = reconstructions(demo, images, split)
        out["ceiling"][split] = evaluate(list(recon), captions)
        out["originals"][split] = evaluate(list(images), captions)
        out["vae"][f"psnr_db_{split}"] = float(np.mean(psnr(images, recon)))
    out["vae"]["psnr_db"] = out["vae"]["psnr_db_eval"]
    for key in ("floor", "ceiling", "originals"):
        out[key]["overall"] = out[key]["eval"]["overall"]
    return out


# ------------------------------------------------------------------------------------------------- images


def labelled_grid(images: list[np.ndarray], captions: list[str], passed: list[bool], *, columns: int = 6,
                  min_side: int = 128) -> np.ndarray:
    """Each image enlarged a whole number of times (nearest) to at least ``min_side`` px, so that three lines of
    caption fit under it; framed green when the mini GenEval accepts it for its caption and red when not."""
    font = ImageFont.load_default(size=11)
    side = images[0].shape[0] * math.ceil(min_side / images[0].shape[0])
    frame, line_height, lines = 3, 13, 3
    tile_w, tile_h = side + 2 * frame, side + 2 * frame + lines * line_height + 4
    rows = math.ceil(len(images) / columns)
    canvas = Image.new("RGB", (columns * tile_w, rows * tile_h), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    for i, (image, caption, ok) in enumerate(zip(images, captions, passed, strict=True)):
        x, y = (i % columns) * tile_w, (i // columns) * tile_h
        draw.rectangle((x, y, x + tile_w - 1, y + side + 2 * frame - 1), fill=PASS if ok else MISS)
        big = Image.fromarray(image).resize((side, side), Image.Resampling.NEAREST)
        canvas.paste(big, (x + frame, y + frame))
        for k, text in enumerate(_wrap(caption, font, tile_w - 4)[:lines]):
            draw.text((x + 2, y + side + 2 * frame + 2 + k * line_height), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _wrap(text: str, font, width: int) -> list[str]:
    lines, current = [], ""
    for word in text.split():
        trial = f"{current} {word}".strip()
        if current and font.getlength(trial) > width:
            lines.append(current)
            current = word
        else:
            current = trial
    return lines + [current]


def write_grid(demo: Demo, passed: dict[str, list[bool]]) -> Path:
    from nextstep_jax.generation.image_files import write_png

    b = demo.budget
    images, captions, ok = [], [], []
    for split, count in (("eval", b.grid_eval), ("novel", b.grid_novel)):
        paths = sample_files(demo, "model")[split][:count]
        images += [read_png(p) for p in paths]
        captions += [json.loads(p.with_suffix(".json").read_text())["prompt"] for p in paths]
        ok += passed[split][:count]
    path = demo.out / GRID_PNG
    write_png(path, labelled_grid(images, captions, ok),
              {"prompts": json.dumps(captions), "layout": f"first {b.grid_eval} eval then first {b.grid_novel} "
                                                          "novel prompts; green frame: passes the mini GenEval"})
    return path


def write_curves(demo: Demo) -> list[Path]:
    """The learning curves of the training stages, drawn by scripts/plot_metrics.py."""
    written = []
    workdirs = {"nextstep": demo.workdir("model"), "vae": demo.vae_workdir, "decoder": demo.decoder_workdir}
    for stage, (name, keys) in CURVES.items():
        metrics = workdirs[stage] / "metrics.jsonl"
        present = [k for k in keys.split(",") if f'"{k}"' in metrics.read_text()]
        out = demo.out / name
        subprocess.run([sys.executable, str(CONFIGS.parent / "scripts" / "plot_metrics.py"), str(metrics), "-o",
                        str(out), "--keys", ",".join(present), "--smooth", "20"], check=True,
                       stdout=subprocess.DEVNULL)
        written.append(out)
    return written


# ------------------------------------------------------------------------------------------------- report


def host() -> dict:
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"node": platform.node(), "cpu": cpu or platform.processor(), "cpus": os.cpu_count(),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "python": platform.python_version()}


def build_report(demo: Demo, scores: dict, stages: dict) -> dict:
    from nextstep_jax.checkpoint import read_model_config
    from nextstep_jax.generation.settings import STORED_SETTINGS_FILE
    from nextstep_jax.models.nextstep import abstract_variables

    import jax

    model_cfg = read_model_config(demo.model("model"))
    params = jax.tree.leaves(abstract_variables(model_cfg)["params"])
    return {
        "seed": demo.seed,
        "geneval": scores["geneval"],
        "floor": scores["floor"],
        "ceiling": scores["ceiling"],
        "originals": scores["originals"],
        "vae": scores["vae"],
        "prompts": {s: demo.num_prompts(s) for s in SPLITS},
        "model": {"parameters": int(sum(math.prod(p.shape) for p in params)), "folder": str(demo.model("model")),
                  "hidden_size": model_cfg.hidden_size, "num_layers": model_cfg.num_layers,
                  "fm_head_dim": model_cfg.fm_head_dim, "fm_head_layers": model_cfg.fm_head_layers},
        "sampling": json.loads((demo.model("model") / STORED_SETTINGS_FILE).read_text()),
        "budget": dataclasses.asdict(demo.budget),
        "stages": stages,
        "elapsed_s": round(sum(s["wall_s"] for s in stages.values()), 1),
        "host": host(),
    }


def markdown(report: dict) -> str:
    from nextstep_jax.data.shapes import CATEGORIES

    def row(name, values):
        return f"| {name} | " + " | ".join(f"{values[c]:.2f}" if c in values else "-"
                                           for c in (*CATEGORIES, "overall")) + " |"

    lines = ["# NextStep demo on the shapes data", "",
             f"Seed {report['seed']}; {report['model']['parameters']:,} parameters; sampling "
             f"cfg {report['sampling']['guidance_scale']}, {report['sampling']['num_steps']} steps "
             f"({report['sampling']['method']}); {report['elapsed_s']:.0f} s of stage time on "
             f"{report['host']['cpus']} CPUs ({report['host']['cpu']}).", ""]
    for split in SPLITS:
        lines += [f"## mini GenEval, `{split}` split ({report['prompts'][split]} prompts)", "",
                  "| images | " + " | ".join((*CATEGORIES, "overall")) + " |",
                  "|---" * (len(CATEGORIES) + 2) + "|",
                  row("NextStep samples", report["geneval"][split]),
                  row("floor: the untrained model", report["floor"][split]),
                  row("ceiling: VAE reconstructions", report["ceiling"][split]),
                  row("the held-out images", report["originals"][split]), ""]
    lines += [f"VAE reconstruction PSNR: {report['vae']['psnr_db_eval']:.1f} dB (eval), "
              f"{report['vae']['psnr_db_novel']:.1f} dB (novel).", "",
              "## Stages", "", "| stage | wall s | counts |", "|---|---|---|"]
    for name, s in report["stages"].items():
        counts = ", ".join(f"{k} {v}" for k, v in s.items() if k != "wall_s")
        lines.append(f"| {name} | {s['wall_s']:.1f} | {counts} |")
    return "\n".join(lines) + "\n"


def write_report(demo: Demo, report: dict) -> None:
    write_file(demo.out / REPORT_MD, markdown(report).encode())
    write_file(demo.out / REPORT_JSON, (json.dumps(report, indent=1) + "\n").encode())  # last: marks it done
