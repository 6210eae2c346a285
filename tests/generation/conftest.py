"""Fixtures of the generation tests: the golden tokenizer and prompt builder, and the golden pipeline cases."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from nextstep_jax.checkpoint import read_model_config, read_vae_config
from nextstep_jax.generation.prompts import PromptBuilder, PromptTokenizer
from nextstep_jax.generation.settings import SamplingSettings


@pytest.fixture(scope="session")
def tok(golden_dir):
    return PromptTokenizer(golden_dir / "model")


@pytest.fixture(scope="session")
def prompts(golden_dir, tok):
    return PromptBuilder(tok, read_model_config(golden_dir / "model"), read_vae_config(golden_dir / "vae"))


@dataclasses.dataclass(frozen=True)
class PipelineCase:
    """One official ``generate_image`` call: its kwargs (json), recorded arrays, captions, input images (or
    None) and the same call as our settings."""

    kwargs: dict
    arrays: dict
    captions: list[str]
    images: list[np.ndarray] | None
    settings: SamplingSettings


@pytest.fixture(params=("i_pipeline_t2i", "i_pipeline_edit"))
def pipeline_case(request, golden_dir, load_case) -> PipelineCase:
    """Each golden pipeline case; skips those this golden set lacks."""
    path = golden_dir / "cases" / f"{request.param}.json"
    if not path.is_file():
        pytest.skip(f"golden set has no {request.param}")
    kwargs = json.loads(path.read_text())
    case = load_case(request.param)
    captions = kwargs["captions"] if isinstance(kwargs["captions"], list) else [kwargs["captions"]]
    images = None
    if "input_image_uint8" in case:
        stacked = case["input_image_uint8"]
        images = [stacked] if stacked.ndim == 3 else list(stacked)
    settings = SamplingSettings.from_config(
        hw=tuple(kwargs["hw"]), guidance_scale=kwargs["cfg"], image_guidance_scale=kwargs["cfg_img"],
        guidance_schedule=kwargs["cfg_schedule"], num_steps=kwargs["num_sampling_steps"],
        timesteps_shift=kwargs["timesteps_shift"], use_norm=kwargs["use_norm"],
        positive_prompt=kwargs["positive_prompt"], negative_prompt=kwargs["negative_prompt"],
        length_bucket=1)  # the official rows are padded to the longest only
    return PipelineCase(kwargs, case, captions, images, settings)
