"""What to generate: one prompt or a JSONL prompts file, read into jobs with their inputs, and the metadata
record written with each image.

A prompts file has one JSON object per line: ``prompt`` and optionally ``image`` (relative to the file's
folder), ``negative_prompt``, ``positive_prompt`` (these two replace the settings' for that prompt), ``seed``
and ``name`` (the output file name's stem).
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np

from nextstep_jax.generation.image_files import load_rgb
from nextstep_jax.generation.prompts import IMAGE_TAG, PromptBuilder, PromptError
from nextstep_jax.generation.settings import SamplingSettings

RECORD_KEYS = {"prompt", "image", "negative_prompt", "positive_prompt", "seed", "name"}


@dataclasses.dataclass(frozen=True)
class Job:
    """One prompt to generate: its settings, seed and, for editing, its input image (uint8 [H, W, 3])."""

    index: int
    name: str
    prompt: str
    seed: int
    settings: SamplingSettings
    image_path: str | None = None
    image: np.ndarray | None = None

    @property
    def images(self) -> list[np.ndarray] | None:
        return None if self.image is None else [self.image]

    def stem(self, label: int | str) -> str:
        """File name stem of this job's image ``label`` (a sample index, or "grid")."""
        return f"{self.index:04d}_{self.name}_s{self.seed}_{label}"


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text.replace(IMAGE_TAG, "")).strip("-")[:limit].lower() or "image"


def _records(path: Path) -> list[dict]:
    if not path.is_file():
        raise FileNotFoundError(f"prompts file {path} does not exist")
    records = []
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
        if not isinstance(rec.get("seed", 0), int):
            raise PromptError(f"{path}:{lineno}: 'seed' must be an integer")
        if rec.get("image") is not None:
            rec["image"] = str(path.parent / rec["image"])
        records.append(rec)
    if not records:
        raise PromptError(f"{path} contains no prompts")
    return records


def read_jobs(settings: SamplingSettings, *, prompt: str | None = None, prompts_file: str | Path | None = None,
              image: str | None = None, seed: int = 42, image_hw: tuple[int, int] | None = None) -> list[Job]:
    """The jobs of ``prompt`` (with its edit ``image``) or of ``prompts_file``, input images read and resized
    to ``image_hw`` (default: the output size); ``seed`` is the default of every record."""
    records = [{"prompt": prompt, "image": image}] if prompts_file is None else _records(Path(prompts_file))
    jobs = []
    for i, rec in enumerate(records):
        job_seed = rec.get("seed", seed)
        if not 0 <= job_seed < 2 ** 32:
            raise PromptError(f"seed {job_seed} of prompt {i} is outside [0, 2**32)")
        job_settings = dataclasses.replace(
            settings, **{k: rec[k] for k in ("negative_prompt", "positive_prompt") if k in rec})
        path = None if rec.get("image") is None else str(Path(rec["image"]).resolve())
        jobs.append(Job(i, _slug(str(rec.get("name") or rec["prompt"])), rec["prompt"], job_seed, job_settings, path,
                        None if path is None else load_rgb(path, image_hw or job_settings.hw)))
    return jobs


def check_jobs(jobs: list[Job], prompts: PromptBuilder) -> None:
    """Build every job's prompt rows once, so that a bad prompt fails before any weights are loaded."""
    for job in jobs:
        prompts.rows([job.prompt], job.settings, image_sizes=None if job.image is None else [job.image.shape[:2]])


def sample_record(job: Job, sample: int | list[int], **extra) -> dict:
    """The metadata of image ``sample`` of ``job`` (or of a grid: ``sample`` lists the images it tiles), for its
    PNG text chunks and JSON sidecar; the edit image path is absolute, like the model's. Keys use the
    command-line names (``cfg``, ``cfg_img``, ``cfg_schedule``, ``text_tokens``) so that records stay
    comparable across versions; ``extra`` (dtype, model and VAE paths) goes between the sampler fields and
    the text fields. ``job.settings`` must be resolved for the model (``SamplingSettings.for_model``)."""
    s = job.settings
    return {"prompt": job.prompt, "negative_prompt": s.negative_prompt, "positive_prompt": s.positive_prompt,
            "image": job.image_path, "seed": job.seed, "hw": list(s.hw), "cfg": s.guidance_scale,
            "cfg_img": s.image_guidance_scale, "num_steps": s.num_steps, "timesteps_shift": s.timesteps_shift,
            "cfg_schedule": s.guidance_schedule, "method": s.method, "time_grid": s.time_grid,
            "last_step_size": s.last_step_size, "use_norm": s.use_norm, **extra, "text_tokens": s.text_tokens,
            "temperature": s.temperature, "top_p": s.top_p, "prepend_bos": s.prepend_bos, "sample": sample}
