"""The demo's stages: each writes one output under the demo folder, atomically or in a form its ``done`` check
recognises, and goes through the project's own CLIs and library code (``train.main``, ``encode_latents``,
``sample.main``), so the demo runs exactly what a user would run by hand."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import shutil
import sys
from pathlib import Path
from typing import Callable, NamedTuple

from nextstep_jax.demo.budget import Budget

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
VAE_CONFIG, DECODER_CONFIG = CONFIGS / "tokenizer_shapes.py", CONFIGS / "tokenizer_shapes_decoder.py"
NEXTSTEP_CONFIG = CONFIGS / "demo.py"
SPLITS = ("eval", "novel")
MODELS = ("model", "floor")  # the trained model and the untrained one (the floor), sampled the same way


class DemoError(RuntimeError):
    """A stage failed or was interrupted; the message says which and how to go on."""


@dataclasses.dataclass(frozen=True)
class Demo:
    out: Path
    budget: Budget
    seed: int = 0
    progress: bool = True

    @property
    def tokenizer(self) -> Path:
        return self.out / "tokenizer"

    @property
    def vae_workdir(self) -> Path:
        return self.out / "vae"

    @property
    def vae_trained(self) -> Path:
        """The VAE trained whole (stage 2), whose decoder stage 3 fine-tunes."""
        return self.out / "vae" / "release"

    @property
    def decoder_workdir(self) -> Path:
        return self.out / "decoder"

    @property
    def vae(self) -> Path:
        """The demo's image tokenizer: the trained encoder with the fine-tuned decoder."""
        return self.out / "decoder" / "release"

    @property
    def latents(self) -> Path:
        return self.out / "latents"

    def workdir(self, which: str) -> Path:
        return self.out / {"model": "nextstep", "floor": "floor"}[which]

    def model(self, which: str) -> Path:
        return self.out / "model" if which == "model" else self.out / "floor" / "model"

    def samples(self, which: str) -> Path:
        return self.out / "samples" / which

    def prompts(self, split: str) -> list[str]:
        """The held-out prompts of ``split``: the captions of its first images (the ceiling's images)."""
        from nextstep_jax.data.image_pipeline import held_out_images

        return held_out_images(self.held_out_spec(split), self.num_prompts(split), self.budget.image_size)[1]

    def num_prompts(self, split: str) -> int:
        return self.budget.eval_prompts if split == "eval" else self.budget.novel_prompts

    @staticmethod
    def held_out_spec(split: str):
        from nextstep_jax.data.pipeline import SHAPES, DatasetSpec

        return DatasetSpec(source=SHAPES, split=split)


class Stage(NamedTuple):
    name: str
    done: Callable[[Demo], bool]
    run: Callable[[Demo], dict]  # returns its counts (steps, images, ...) for the report


# ---------------------------------------------------------------------------------------------- 1. tokenizer


def train_tokenizer(demo: Demo) -> dict:
    from nextstep_jax.data.shapes import ShapesConfig, generate
    from nextstep_jax.data.tokenizer_training import train_sentencepiece

    shapes = ShapesConfig(size=demo.budget.image_size, split="train")
    captions = [generate(shapes, i).caption for i in range(demo.budget.tokenizer_captions)]
    train_sentencepiece(captions, demo.tokenizer, vocab_size=demo.budget.vocab_size)
    return {"captions": len(captions), "vocab_size": demo.budget.vocab_size}


def tokenizer_done(demo: Demo) -> bool:
    from nextstep_jax.data.tokenizer_training import MODEL_FILE

    return (demo.tokenizer / MODEL_FILE).is_file()


# ---------------------------------------------------------------------------------------------------- 2. vae


def vae_overrides(demo: Demo) -> list[str]:
    from nextstep_jax.configs import load_config_file

    channels = load_config_file(NEXTSTEP_CONFIG).model.latent_channels  # the demo's NextStep decides the latent
    return [f"seed={demo.seed}", f"data.seed={demo.seed}", f"data.image_size={demo.budget.image_size}",
            f"vae.z_channels={channels}"]


def train_vae(demo: Demo) -> dict:
    return _train(demo, VAE_CONFIG, demo.vae_workdir, demo.vae_trained, [*vae_overrides(demo), *demo.budget.vae])


def vae_done(demo: Demo) -> bool:
    return (demo.vae_trained / "config.json").is_file()


# ------------------------------------------------------------------------------------------------ 3. decoder


def fine_tune_decoder(demo: Demo) -> dict:
    """The decoder alone, with more noise: it learns to draw clean shapes from slightly-off tokens, and the
    encoder, hence the latent space the NextStep stage learns, stays the trained one."""
    overrides = [*vae_overrides(demo), f"init.vae={demo.vae_trained}", *demo.budget.decoder]
    return _train(demo, DECODER_CONFIG, demo.decoder_workdir, demo.vae, overrides)


def decoder_done(demo: Demo) -> bool:
    return (demo.vae / "config.json").is_file()


# ------------------------------------------------------------------------------------------------ 4. latents


def cache_latents(demo: Demo) -> dict:
    from nextstep_jax.data.buckets import PIXELS_PER_TOKEN
    from nextstep_jax.data.shapes import ShapesConfig
    from nextstep_jax.data.sources import ShapesSource
    from nextstep_jax.encode_latents import encode_records, sharded_encoder, vae_encode_fn

    b = demo.budget
    encode_fn, params = vae_encode_fn(demo.vae)
    run, batch = sharded_encoder(encode_fn, params, 64)
    # Two-object captions name first the object whose 16-pixel tokens come first: without it the model's first
    # tokens must guess which of the two it starts with, and it often drew a blend of both colours (README).
    source = ShapesSource(ShapesConfig(size=b.image_size, split="train", caption_order_grid=PIXELS_PER_TOKEN),
                          b.latent_images)
    _say(f"encoding {b.latent_images} training images with {demo.vae}")
    summary = encode_records(source, demo.latents, run, batch, image_size=b.image_size, multi_aspect=False,
                             progress=demo.progress)
    if summary["written"] != b.latent_images:
        raise DemoError(f"latents: {summary['written']} of {b.latent_images} images encoded ({summary})")
    return {"images": summary["written"]}


def latents_done(demo: Demo) -> bool:
    return (demo.latents / "meta.json").is_file()


# ------------------------------------------------------------------------------------- 5./6. nextstep, floor


def nextstep_overrides(demo: Demo) -> list[str]:
    b = demo.budget
    return [f"seed={demo.seed}", f"data.seed={demo.seed}", f"data.tokenizer={demo.tokenizer}",
            f"data.datasets=({{'source': {str(demo.latents)!r}}},)", f"init.vae={demo.vae}",
            f"data.image_size={b.image_size}", f"sampling.hw=({b.image_size}, {b.image_size})", *b.nextstep]


def train_nextstep(demo: Demo) -> dict:
    return _train(demo, NEXTSTEP_CONFIG, demo.workdir("model"), demo.model("model"), nextstep_overrides(demo))


def export_floor(demo: Demo) -> dict:
    """The untrained model (its initial parameters, same config and seed), exported like the trained one."""
    return _train(demo, NEXTSTEP_CONFIG, demo.workdir("floor"), demo.model("floor"),
                  [*nextstep_overrides(demo), "total_steps=0"])


def model_done(which: str) -> Callable[[Demo], bool]:
    return lambda demo: (demo.model(which) / "config.json").is_file()


def _train(demo: Demo, config: Path, workdir: Path, export: Path, overrides: list[str]) -> dict:
    """``python -m nextstep_jax.train`` to completion and export; a run stopped early (SIGTERM) keeps its
    checkpoint, and its premature export is removed so that the rerun resumes and exports."""
    from nextstep_jax import train
    from nextstep_jax.training.workdir import CHECKPOINTS_DIR, WORKDIR_CONFIG

    argv = ["--config", str(config), "--workdir", str(workdir), "--export", str(export),
            *(f"--config.{o}" for o in overrides), *([] if demo.progress else ["--no-progress"])]
    _say("python -m nextstep_jax.train " + " ".join(argv))
    code = train.main(argv)
    if code != 0:
        raise DemoError(f"training in {workdir} exited with status {code}")
    total = json.loads((workdir / WORKDIR_CONFIG).read_text())["total_steps"]
    reached = max((int(p.name) for p in (workdir / CHECKPOINTS_DIR).iterdir() if p.name.isdigit()),
                  default=0)
    if reached < total:
        shutil.rmtree(export, ignore_errors=True)
        raise DemoError(f"training in {workdir} stopped at step {reached} of {total}; run the demo again to resume")
    return {"steps": total}


# ------------------------------------------------------------------------------------------------ 7. samples


def sample_models(demo: Demo) -> dict:
    """Every held-out prompt through ``python -m nextstep_jax.sample`` with each model's stored settings;
    prompt i of the prompts file has seed ``seed * 65536 + i``, so one command line reproduces any image."""
    from tqdm import tqdm

    from nextstep_jax import sample

    counts = {}
    for which in MODELS:
        if _samples_complete(demo, which):
            continue
        folder = demo.samples(which)
        folder.mkdir(parents=True, exist_ok=True)
        prompts_file = folder / "prompts.jsonl"
        records = [{"prompt": p, "seed": demo.seed * 65536 + i, "name": f"{split}-{j:04d}"}
                   for i, (split, j, p) in enumerate(_prompt_rows(demo))]
        prompts_file.write_text("".join(json.dumps(r) + "\n" for r in records))
        argv = ["--model", str(demo.model(which)), "--prompts-file", str(prompts_file), "--out", str(folder),
                "--no-progress"]
        _say("python -m nextstep_jax.sample " + " ".join(argv))
        with tqdm(total=len(records), desc=f"sample {which}", unit="img", file=sys.stderr,
                  disable=not demo.progress) as bar, contextlib.redirect_stdout(_CountLines(bar)):
            code = sample.main(argv)
        if code != 0:
            raise DemoError(f"sampling {demo.model(which)} exited with status {code}")
        counts[which] = len(records)
    return {"images": sum(counts.values()), "per_model": counts}


def samples_done(demo: Demo) -> bool:
    return all(_samples_complete(demo, which) for which in MODELS)


def sample_files(demo: Demo, which: str) -> dict[str, list[Path]]:
    """split -> its PNGs, in prompt order (the file names start with the prompt's index)."""
    files = sorted(demo.samples(which).glob("*.png"))
    out, start = {}, 0
    for split in SPLITS:
        out[split] = files[start: start + demo.num_prompts(split)]
        start += demo.num_prompts(split)
    return out


def _prompt_rows(demo: Demo) -> list[tuple[str, int, str]]:
    return [(split, j, p) for split in SPLITS for j, p in enumerate(demo.prompts(split))]


def _samples_complete(demo: Demo, which: str) -> bool:
    expected = sum(demo.num_prompts(s) for s in SPLITS)
    return len(list(demo.samples(which).glob("*.png"))) == expected


class _CountLines:
    """A stdout that advances a progress bar by one per line (the sample CLI prints each file it wrote)."""

    def __init__(self, bar):
        self._bar = bar

    def write(self, text: str) -> int:
        self._bar.update(text.count("\n"))
        return len(text)

    def flush(self) -> None:
        pass


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


STAGES = (
    Stage("tokenizer", tokenizer_done, train_tokenizer),
    Stage("vae", vae_done, train_vae),
    Stage("decoder", decoder_done, fine_tune_decoder),
    Stage("latents", latents_done, cache_latents),
    Stage("nextstep", model_done("model"), train_nextstep),
    Stage("floor", model_done("floor"), export_floor),
    Stage("samples", samples_done, sample_models),
)
