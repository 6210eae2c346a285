"""Sample grids of a NextStep run: one image per ``eval.prompts`` caption through the generation code, as one
PNG ``samples/step_<step>.png``, every ``eval.every_steps`` steps and at the end."""

from __future__ import annotations

import json
import time
from pathlib import Path

import jax

from nextstep_jax.generation.generator import Generator
from nextstep_jax.generation.image_files import grid, write_png
from nextstep_jax.generation.prompts import PromptBuilder, PromptTokenizer
from nextstep_jax.generation.settings import SamplingSettings
from nextstep_jax.models.layouts import for_decoding
from nextstep_jax.training.distributed import say


def eval_settings(config) -> SamplingSettings:
    """The sampling settings of the sample grids: the ``sampling`` section at ``eval.hw``."""
    changes = {"hw": tuple(config.eval.hw)} if config.eval.hw else {}
    return SamplingSettings.from_config(config.sampling, **changes)


def check_prompts(config, tokenizer_path: str) -> None:
    """The sample-grid prompts turn into prompt rows with the sampling settings (raises on bad ones)."""
    if not config.eval.every_steps or not config.eval.prompts:
        return
    PromptBuilder(PromptTokenizer(tokenizer_path), config.model, config.vae).rows(list(config.eval.prompts),
                                                                              eval_settings(config))


class SampleGrids:
    """Writes the grids (process 0; single-process runs only: the generation program gathers its images on
    one host). The Generator is compiled once; its params are set for each grid and dropped after it."""

    def __init__(self, config, tokenizer_path: str, vae_params, folder: Path):
        self._config = config
        self._tokenizer_path = tokenizer_path
        self._vae_params = vae_params
        self._folder = folder
        self._every = config.eval.every_steps
        self.enabled = bool(self._every and config.eval.prompts)
        self._generator = None
        if self.enabled and jax.process_count() > 1:
            say("sample grids are written by single-process runs only; eval.every_steps ignored")
            self.enabled = False

    def due(self, step: int) -> bool:
        return self.enabled and (step % self._every == 0 or step == self._config.total_steps)

    def write(self, step: int, params) -> dict:
        """The grid of ``step``; returns its scalars for the metrics line (its time)."""
        config = self._config
        started = time.perf_counter()
        if self._generator is None:
            self._generator = Generator(config.model, params, config.vae, self._vae_params,
                                        PromptTokenizer(self._tokenizer_path))
        else:
            self._generator.variables = {"params": for_decoding(config.model, params)[1]}
        result = self._generator.generate(list(config.eval.prompts), eval_settings(config), seed=config.eval.seed)
        self._generator.variables = None
        path = self._folder / f"step_{step:07d}.png"
        write_png(path, grid(list(result.images)), {"step": str(step), "prompts": json.dumps(list(config.eval.prompts)),
                                                    "seed": str(config.eval.seed)})
        seconds = time.perf_counter() - started
        say(f"step {step}: sample grid {path} ({seconds:.1f} s)")
        return {"eval/sample_seconds": seconds}
