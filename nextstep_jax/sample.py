"""Text-to-image and image editing from the command line: ``python -m nextstep_jax.sample``.

    python -m nextstep_jax.sample --model /path/NextStep-1-Large --prompt "A red fox in the snow." \\
        --hw 512,512 --cfg 7.5 --num-images 4 --seed 42 --out samples/
    python -m nextstep_jax.sample --model /path/NextStep-1-Large-Edit --image dog.jpg \\
        --prompt "<image>Add a pirate hat to the dog's head." --cfg 7.5 --cfg-img 2.0 --timesteps-shift 3.2
    python -m nextstep_jax.sample --model ckpt/ --prompt "A house." --config.sampling.guidance_schedule=linear \\
        --config.sampling.text_tokens=64 --config.sampling.temperature=0.7

The sampling settings are the config's ``sampling`` section (fields and defaults: ``sampling_config`` in
nextstep_jax/configs.py); the everyday ones also have flags. The settings stored with a model are its
folder's ``sampling.json`` (a JSON object of ``sampling`` fields; in a converted checkpoint, release/sampling.json,
where ``nextstep_jax.convert`` copies it). Of the ``model`` section only ``dtype`` applies here (the
architectures come from the model and VAE folders); ``data.tokenizer`` is the default of ``--tokenizer``.

Everything is validated (the output folder, files, prompts, images, sizes) before the weights are loaded; a
bad input exits with status 2 and a one-line message, and nothing is written. Each image, and the --grid
image, is a PNG carrying the prompt, seed and settings in text chunks, with a JSON sidecar of the same name;
files are written atomically.
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np

from nextstep_jax import configs
from nextstep_jax.checkpoint import CheckpointError, load_model, load_vae, read_model_config, read_vae_config, \
    release_files
from nextstep_jax.generation.generator import Generator
from nextstep_jax.checkpoint.converted.store import VAE_DIR
from nextstep_jax.generation.image_files import ImageFileError, check_output_folder, grid, write_sample
from nextstep_jax.generation.jobs import check_jobs, read_jobs, sample_record
from nextstep_jax.generation.prompts import IMAGE_TAG, PromptBuilder, PromptError, PromptTokenizer
from nextstep_jax.generation.settings import SamplingSettings, SettingsError, read_stored_settings

USER_ERRORS = (PromptError, SettingsError, ImageFileError, CheckpointError, configs.ConfigError, FileNotFoundError)
# Flags for the everyday sampling knobs (the official pipeline's names): flag dest -> ``sampling`` field.
SAMPLING_FLAGS = {"hw": "hw", "cfg": "guidance_scale", "cfg_img": "image_guidance_scale", "steps": "num_steps",
                  "timesteps_shift": "timesteps_shift", "positive_prompt": "positive_prompt",
                  "negative_prompt": "negative_prompt"}


def _pair(text: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected H,W (e.g. 512,512), got {text!r}") from None
    return h, w


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.sample", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    configs.add_config_arguments(p)
    p.add_argument("--model", required=True,
                   help="official release folder (config.json + *.safetensors) or a converted Orbax checkpoint")
    p.add_argument("--vae", help="VAE release folder (config.json + checkpoint.safetensors or checkpoint.pt) or "
                                 "converted checkpoint; default <model>/vae")
    p.add_argument("--tokenizer", help="tokenizer.json / tokenizer.model or its folder; default: data.tokenizer, "
                                       "else the model's release files")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", help=f"caption; for editing it contains {IMAGE_TAG} once")
    src.add_argument("--prompts-file", help="JSONL, one object per line with 'prompt' and optionally 'image', "
                                            "'negative_prompt', 'positive_prompt', 'seed' (overrides --seed), 'name'; "
                                            "image paths are relative to the file's folder")
    p.add_argument("--image", help=f"input image for editing (the prompt's {IMAGE_TAG})")
    p.add_argument("--image-hw", type=_pair, help="resize input images to H,W (default: the output size)")
    defaults = configs.sampling_config()
    knobs = p.add_argument_group("sampling knobs (each sets one field of the config's sampling section)")
    knobs.add_argument("--hw", type=_pair, help=f"sampling.hw: output size H,W (default {defaults.hw})")
    knobs.add_argument("--cfg", type=float, help="sampling.guidance_scale: text guidance "
                                                 f"(default {defaults.guidance_scale}; 1 = off)")
    knobs.add_argument("--cfg-img", type=float, help="sampling.image_guidance_scale: image guidance for editing "
                                                     f"(default {defaults.image_guidance_scale} = off)")
    knobs.add_argument("--steps", type=int, help="sampling.num_steps: flow-matching steps per token "
                                                 f"(default {defaults.num_steps})")
    knobs.add_argument("--timesteps-shift", type=float,
                       help=f"sampling.timesteps_shift (default {defaults.timesteps_shift})")
    knobs.add_argument("--positive-prompt", help="sampling.positive_prompt: appended to every prompt after one space")
    knobs.add_argument("--negative-prompt", help="sampling.negative_prompt: unconditional prompt (default empty)")
    p.add_argument("--num-images", type=int, default=1, help="images per prompt")
    p.add_argument("--batch-size", type=int, help="images per compiled call (default --num-images)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--dtype", choices=("float32", "bfloat16"),
                   help="compute and parameter dtype (model.dtype, default float32)")
    p.add_argument("--out", default="samples", help="output folder (default ./samples)")
    p.add_argument("--grid", action="store_true", help="also write a grid of each prompt's images")
    p.add_argument("--no-progress", action="store_true")
    return p


def parse_args(argv=None) -> tuple[argparse.Namespace, list[str]]:
    p = _parser()
    args, overrides = configs.parse_args(p, argv)
    if args.num_images < 1:
        p.error("--num-images must be >= 1")
    if args.batch_size is not None and args.batch_size < 1:
        p.error("--batch-size must be >= 1")
    if args.prompts_file and args.image:
        p.error("--image goes with --prompt; in --prompts-file give 'image' per record")
    return args, overrides


def _progress(args, job, start: int, count: int, num_tokens: int):
    """A progress bar over the image tokens of one call (a null context with --no-progress)."""
    if args.no_progress:
        return nullcontext()
    from tqdm import tqdm

    several = count < args.num_images
    label = f"[{job.index + 1}] {job.name}" + (f" images {start}-{start + count - 1}" if several else "")
    return tqdm(total=num_tokens, desc=label, unit="tok", file=sys.stderr, leave=False)


def run(args, overrides: list[str]) -> list[Path]:
    """Validate everything, then load the weights and generate; returns the files written."""
    check_output_folder(args.out)
    model_path = Path(args.model)
    model_cfg = read_model_config(model_path)
    vae_path = Path(args.vae) if args.vae else model_path / VAE_DIR
    if not args.vae and not vae_path.exists():
        raise FileNotFoundError(f"{model_path} has no {VAE_DIR}/ folder: pass --vae (the release's VAE folder, or "
                                "a checkpoint converted from it by nextstep_jax.convert)")
    vae_cfg = read_vae_config(vae_path)
    stored = read_stored_settings(release_files(model_path))
    config = configs.resolve(args, overrides, stored=None if stored is None else {"sampling": stored})
    flags = {field: getattr(args, dest) for dest, field in SAMPLING_FLAGS.items() if getattr(args, dest) is not None}
    settings = SamplingSettings.from_config(config.sampling, **flags).for_model(model_cfg)
    dtype = args.dtype or config.model.dtype
    tok = PromptTokenizer(args.tokenizer or config.data.tokenizer or release_files(model_path))
    jobs = read_jobs(settings, prompt=args.prompt, prompts_file=args.prompts_file, image=args.image, seed=args.seed,
                     image_hw=args.image_hw)
    check_jobs(jobs, PromptBuilder(tok, model_cfg, vae_cfg))
    out_dir = Path(args.out)

    print(f"loading {model_path} and {vae_path} ({dtype})", file=sys.stderr)
    model_cfg, params = load_model(model_path, dtype=dtype)
    vae_cfg, vae_params = load_vae(vae_path, dtype=dtype)
    generator = Generator(configs.replace(model_cfg, dtype=dtype), params, configs.replace(vae_cfg, dtype=dtype),
                          vae_params, tok, donate=True)
    paths = {"dtype": dtype, "model": str(model_path.resolve()), "vae": str(vae_path.resolve())}
    batch = args.batch_size or args.num_images
    written = []
    for job in jobs:
        images = []
        for start in range(0, args.num_images, batch):
            count = min(batch, args.num_images - start)
            with _progress(args, job, start, count, generator.prompts.num_image_tokens(job.settings)) as bar:
                result = generator.generate([job.prompt], job.settings, images=job.images,
                                            num_images_per_caption=count, seed=job.seed,
                                            sample_ids=np.arange(start, start + count),
                                            progress=None if bar is None else lambda k: bar.update(1))
            for j in range(count):
                record = sample_record(job, start + j, **paths)
                if result.text_ids is not None:
                    record["generated_text"] = tok.decode(result.text_ids[j][: int(result.text_lengths[j])])
                files = write_sample(out_dir / job.stem(start + j), result.images[j], record)
                print(files[0])
                written += files
                images.append(result.images[j])
        if args.grid and len(images) > 1:
            record = sample_record(job, list(range(args.num_images)), **paths)
            files = write_sample(out_dir / job.stem("grid"), grid(images), record)
            print(files[0])
            written += files
    print(f"wrote {len(written)} files to {out_dir.resolve()}", file=sys.stderr)
    return written


def main(argv=None) -> int:
    args, overrides = parse_args(argv)
    try:
        run(args, overrides)
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
