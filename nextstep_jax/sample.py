"""Text-to-image and image editing from the command line: ``python -m nextstep_jax.sample``.

    python -m nextstep_jax.sample --model /path/NextStep-1-Large --prompt "A red fox in the snow." \\
        --hw 512,512 --cfg 7.5 --num-images 4 --seed 42 --out samples/
    python -m nextstep_jax.sample --model /path/NextStep-1-Large-Edit --image dog.jpg \\
        --prompt "<image>Add a pirate hat to the dog's head." --cfg 7.5 --cfg-img 2.0 --timesteps-shift 3.2

Everything is validated (files, prompts, images, sizes) before the weights are loaded; a bad input exits
with status 2 and a one-line message, and nothing is written. Each image is a PNG carrying the prompt,
seed and settings in text chunks, with a JSON sidecar of the same name; files are written atomically.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np

from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.load import load_nextstep, load_vae
from nextstep_jax.checkpoint.store import RELEASE_DIR, is_checkpoint, read_manifest, restore_params
from nextstep_jax.configs import model_config_from_release, vae_config_from_release
from nextstep_jax.generation import CFG_SCHEDULES, Generator, SamplerSettings
from nextstep_jax.image_files import ImageFileError, grid, load_rgb, write_json, write_png
from nextstep_jax.models.fm_head import GRIDS, METHODS
from nextstep_jax.models.fused_layout import fuse_projections
from nextstep_jax.models.vae import downsample_factor
from nextstep_jax.prompts import IMAGE_TAG, PromptError, PromptTokenizer, build_prompt_rows
from nextstep_jax.text_decoding import TextSettings

USER_ERRORS = (PromptError, ImageFileError, CheckpointError, FileNotFoundError)
RECORD_KEYS = {"prompt", "image", "negative_prompt", "positive_prompt", "seed", "name"}


@dataclasses.dataclass
class Job:
    index: int
    name: str
    prompt: str
    seed: int
    negative_prompt: str | None
    positive_prompt: str | None
    image_path: str | None = None
    image: np.ndarray | None = None


def _pair(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 512,512), got {text!r}") from None
    return h, w


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.sample", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True,
                   help="official release folder (config.json + *.safetensors) or a converted Orbax checkpoint")
    p.add_argument("--vae", help="VAE release folder (config.json + checkpoint.safetensors or checkpoint.pt) or converted checkpoint; "
                                 "default <model>/vae")
    p.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model or its folder; default: the model's "
                                       "folder (for a converted checkpoint its release/ folder)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help=f"caption; for editing it contains {IMAGE_TAG} once")
    src.add_argument("--prompts-file", help="JSONL, one object per line with 'prompt' and optionally 'image', "
                                            "'negative_prompt', 'positive_prompt', 'seed' (overrides --seed), 'name'; "
                                            "image paths are relative to the file's folder")
    p.add_argument("--image", help=f"input image for editing (the prompt's {IMAGE_TAG})")
    p.add_argument("--image-hw", type=_pair, help="resize input images to H,W (default: --hw)")
    p.add_argument("--hw", type=_pair, default=(512, 512), help="output size H,W (default 512,512)")
    p.add_argument("--cfg", type=float, default=7.5, help="text guidance (default 7.5; 1 = off)")
    p.add_argument("--cfg-img", type=float, default=1.0, help="image guidance for editing (default 1 = off)")
    p.add_argument("--cfg-schedule", choices=CFG_SCHEDULES, default="constant")
    p.add_argument("--timesteps-shift", type=float, default=1.0)
    p.add_argument("--steps", type=int, default=50, help="flow-matching sampling steps per token (default 50)")
    p.add_argument("--sampler", choices=METHODS, default="sde")
    p.add_argument("--time-grid", choices=GRIDS, help="default: from the model's config schema")
    p.add_argument("--use-norm", action=argparse.BooleanOptionalAction, default=None,
                   help="layer-normalise sampled tokens (default: on for NextStep-1, off for 1.1)")
    p.add_argument("--positive-prompt", help="appended to every prompt after one space")
    p.add_argument("--negative-prompt", help="unconditional prompt for CFG (default empty)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, help="images per compiled call (default --num-images)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                   help="compute and parameter dtype")
    p.add_argument("--text-tokens", type=int, default=0,
                   help="decode up to N text tokens (e.g. a thinking span) before the image (default 0 = off)")
    p.add_argument("--temperature", type=float, default=0.0, help="text sampling temperature (0 = greedy)")
    p.add_argument("--top-p", type=float, default=1.0, help="text nucleus sampling mass")
    p.add_argument("--prepend-bos", action="store_true", help="put the BOS token before every prompt")
    p.add_argument("--length-bucket", type=int, default=64,
                   help="prompt lengths are padded to a multiple of this, so prompts share one compilation")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--grid", action="store_true", help="also write a grid of each prompt's images")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    for name in ("num_images", "steps"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.prompts_file and args.image:
        p.error("--image goes with --prompt; in --prompts-file give 'image' per record")
    if args.text_tokens < 0 or args.temperature < 0 or not 0 < args.top_p <= 1:
        p.error("need --text-tokens >= 0, --temperature >= 0 and 0 < --top-p <= 1")
    if args.length_bucket < 1:
        p.error("--length-bucket must be >= 1")
    return args


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text.replace(IMAGE_TAG, "")).strip("-")[:limit].lower() or "image"


def _read_jobs(args) -> list[Job]:
    if args.prompt is not None:
        return [Job(0, _slug(args.prompt), args.prompt, args.seed, args.negative_prompt, args.positive_prompt,
                    args.image)]
    path = Path(args.prompts_file)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    jobs = []
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PromptError(f"{path}:{lineno}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise PromptError(f"{path}:{lineno}: each line must be an object with a string 'prompt'")
        unknown = set(rec) - RECORD_KEYS
        if unknown:
            raise PromptError(f"{path}:{lineno}: unknown keys {sorted(unknown)} (allowed: {sorted(RECORD_KEYS)})")
        image = rec.get("image")
        if image is not None:
            image = str(path.parent / image)
        seed = rec.get("seed", args.seed)
        if not isinstance(seed, int):
            raise PromptError(f"{path}:{lineno}: 'seed' must be an integer")
        jobs.append(Job(len(jobs), _slug(str(rec.get("name") or rec["prompt"])), rec["prompt"], seed,
                        rec.get("negative_prompt", args.negative_prompt),
                        rec.get("positive_prompt", args.positive_prompt), image))
    if not jobs:
        raise PromptError(f"{path} contains no prompts")
    return jobs


@dataclasses.dataclass(frozen=True)
class Source:
    """A model or VAE: an official release folder, or a checkpoint converted by ``nextstep_jax.convert``."""

    path: Path
    kind: str  # "nextstep" | "vae"
    converted: bool
    cfg: object

    @classmethod
    def open(cls, path: Path, kind: str) -> Source:
        if is_checkpoint(path):
            manifest = read_manifest(path)
            if manifest.kind != kind:
                raise CheckpointError(f"{path} is a converted {manifest.kind} checkpoint, expected {kind}")
            return cls(path, kind, True, manifest.model_config())
        config = path / "config.json"
        if not config.is_file():
            raise FileNotFoundError(f"{path}: no config.json (expected an official release folder or a checkpoint "
                                    "converted by nextstep_jax.convert)")
        try:
            cfg = model_config_from_release(config) if kind == "nextstep" else vae_config_from_release(config)
        except (ValueError, json.JSONDecodeError) as e:
            raise CheckpointError(str(e)) from None
        return cls(path, kind, False, cfg)

    def load(self, dtype: str):
        """(config, params) in ``dtype``. NextStep in its decode layout: layers unrolled (slicing stacked
        weights every step measured slower) and q/k/v, gate/up fused (one weight read each per layer)."""
        param_dtype = jnp.dtype(dtype)
        if self.converted:
            cfg, params = restore_params(self.path, scan_layers=False if self.kind == "nextstep" else None,
                                         dtype=param_dtype)
        elif self.kind == "nextstep":
            cfg, params = load_nextstep(self.path, scan_layers=False, param_dtype=param_dtype)
        else:
            cfg, params = load_vae(self.path, param_dtype=param_dtype)
        cfg.dtype = dtype
        if self.kind == "nextstep":
            cfg, params = fuse_projections(cfg, params, donate=True)
        return cfg, params


def _sources(args) -> tuple[Source, Source, Path]:
    model = Source.open(Path(args.model), "nextstep")
    release_files = model.path / RELEASE_DIR if model.converted else model.path
    vae = Source.open(Path(args.vae) if args.vae else model.path / "vae", "vae")
    return model, vae, Path(args.tokenizer) if args.tokenizer else release_files


def _settings_record(args, job: Job, sampler: SamplerSettings, model: Source, vae: Source) -> dict:
    return {"prompt": job.prompt, "negative_prompt": job.negative_prompt, "positive_prompt": job.positive_prompt,
            "image": job.image_path, "seed": job.seed, "hw": list(args.hw), "cfg": args.cfg,
            "cfg_img": args.cfg_img, **dataclasses.asdict(sampler), "dtype": args.dtype,
            "model": str(model.path.resolve()), "vae": str(vae.path.resolve()), "text_tokens": args.text_tokens,
            "temperature": args.temperature, "top_p": args.top_p, "prepend_bos": args.prepend_bos}


def _plan(args, tok: PromptTokenizer, model_cfg, down_factor: int) -> list[tuple[Job, list]]:
    """Every job with its (first sample index, PromptRows) chunks; reads and checks all inputs."""
    batch = args.batch_size or args.num_images
    planned = []
    for job in _read_jobs(args):
        if not 0 <= job.seed < 2 ** 32:
            raise PromptError(f"seed {job.seed} of prompt {job.index} is outside [0, 2**32)")
        if job.image_path is not None:
            job.image = load_rgb(job.image_path, args.image_hw or args.hw)
        chunks = []
        for start in range(0, args.num_images, batch):
            rows = build_prompt_rows(
                tok, [job.prompt], hw=args.hw, down_factor=down_factor,
                image_sizes=None if job.image is None else [job.image.shape[:2]],
                num_images_per_caption=min(batch, args.num_images - start), positive_prompt=job.positive_prompt,
                negative_prompt=job.negative_prompt, cfg=args.cfg, cfg_img=args.cfg_img,
                prepend_bos=args.prepend_bos, bos_id=model_cfg.bos_token_id, length_bucket=args.length_bucket,
                open_cond_rows=args.text_tokens > 0)
            chunks.append((start, rows))
        planned.append((job, chunks))
    return planned


def run(args) -> list[Path]:
    """Validate everything, then load the weights and generate; returns the files written."""
    model, vae, tok_path = _sources(args)
    tok = PromptTokenizer(tok_path)
    tok.check_model_ids(model.cfg)
    is_11 = model.cfg.schema == "1.1"
    sampler = SamplerSettings(
        num_steps=args.steps, timesteps_shift=args.timesteps_shift, cfg_schedule=args.cfg_schedule,
        method=args.sampler, time_grid=args.time_grid or ("nextstep1.1" if is_11 else "nextstep1"),
        use_norm=(not is_11) if args.use_norm is None else args.use_norm)
    text = TextSettings(args.text_tokens, args.temperature, args.top_p)
    planned = _plan(args, tok, model.cfg, downsample_factor(vae.cfg) * model.cfg.latent_patch_size)
    out_dir = Path(args.out)
    if out_dir.exists() and not out_dir.is_dir():
        raise FileNotFoundError(f"--out {out_dir} exists and is not a folder")

    print(f"loading {model.path} and {vae.path} ({args.dtype})", file=sys.stderr)
    generator = Generator(*model.load(args.dtype), *vae.load(args.dtype))
    written = []
    for job, chunks in planned:
        images = []
        for start, rows in chunks:
            result = _run_chunk(generator, rows, sampler, text, args, job, start, len(chunks) > 1)
            for j in range(rows.num_samples):
                record = _settings_record(args, job, sampler, model, vae) | {"sample": start + j}
                if result.text_ids is not None:
                    record["generated_text"] = tok.decode(result.text_ids[j][: int(result.text_lengths[j])])
                written += _write_sample(out_dir / f"{job.index:04d}_{job.name}_s{job.seed}_{start + j}",
                                         result.images[j], record)
                images.append(result.images[j])
        if args.grid and len(images) > 1:
            path = out_dir / f"{job.index:04d}_{job.name}_s{job.seed}_grid.png"
            write_png(path, grid(images), {"prompt": job.prompt, "seed": str(job.seed)})
            print(path)
            written.append(path)
    print(f"wrote {len(written)} files to {out_dir.resolve()}", file=sys.stderr)
    return written


def _run_chunk(generator, rows, sampler, text, args, job, start, several):
    bar = progress = None
    if not args.no_progress:
        from tqdm import tqdm

        label = f"[{job.index + 1}] {job.name}" + (f" images {start}-{start + rows.num_samples - 1}" if several else "")
        bar = tqdm(total=rows.grid[0] * rows.grid[1], desc=label, unit="tok", file=sys.stderr, leave=False)
        progress = lambda k: bar.update(1)  # noqa: E731
    try:
        return generator.generate(rows, sampler, cfg=args.cfg, cfg_img=args.cfg_img, seed=job.seed,
                                  images=None if job.image is None else [job.image],
                                  sample_ids=np.arange(start, start + rows.num_samples),
                                  text=text if rows.open_rows else None, progress=progress)
    finally:
        if bar is not None:
            bar.close()


def _write_sample(stem: Path, image: np.ndarray, record: dict) -> list[Path]:
    """PNG (prompt, seed and the settings JSON in text chunks) + the same JSON as a sidecar."""
    png, sidecar = stem.with_suffix(".png"), stem.with_suffix(".json")
    write_png(png, image, {"prompt": record["prompt"], "seed": str(record["seed"]),
                           "settings": json.dumps(record, ensure_ascii=False), "software": "nextstep_jax"})
    write_json(sidecar, record)
    print(png)
    return [png, sidecar]


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
