"""Sampling settings: the validated, immutable form of the ``sampling`` config section
(``configs.sampling_config``, where every field is described), and the settings a model folder may carry.

A model folder (release or converted checkpoint) may hold its recommended settings in ``sampling.json``: a
JSON object with some of the section's fields, e.g. ``{"image_guidance_scale": 2.0, "timesteps_shift": 3.2}``.
``python -m nextstep_jax.convert`` copies it with the other release files.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from nextstep_jax.configs import sampling_config
from nextstep_jax.models.fm_sampler import GRIDS, GUIDANCE_SCHEDULES, METHODS

STORED_SETTINGS_FILE = "sampling.json"


class SettingsError(ValueError):
    """A sampling setting out of range or of the wrong type; the message names the field."""


def cfg_mult_for(guidance_scale: float, image_guidance_scale: float) -> int:
    """Row groups of the guidance layout (the official ``cfg_mult``): 1 without guidance, 2 with text
    guidance, 3 with text and image guidance. Image-only guidance has no rows in the official layout and
    is refused: the official sampler would count rows the pipeline never built."""
    if guidance_scale == 1.0 and image_guidance_scale != 1.0:
        raise SettingsError(f"image_guidance_scale={image_guidance_scale} needs text CFG (guidance_scale != 1): "
                            "the official layout has no rows for image-only guidance")
    if guidance_scale == 1.0:
        return 1
    return 3 if image_guidance_scale != 1.0 else 2


def _number(name: str, value, kind: type):
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and value != int(value)):
        raise SettingsError(f"sampling.{name} must be {'an integer' if kind is int else 'a number'}, got {value!r}")
    return kind(value)


def _optional_text(name: str, value) -> str | None:
    if value is not None and not isinstance(value, str):
        raise SettingsError(f"sampling.{name} must be a string or None, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
    """Settings of one generation call; build with ``from_config``. ``time_grid`` and ``use_norm`` None mean
    the model's own (``for_model``)."""

    hw: tuple[int, int]
    guidance_scale: float
    image_guidance_scale: float
    guidance_schedule: str
    num_steps: int
    timesteps_shift: float
    method: str
    time_grid: str | None
    last_step_size: float
    use_norm: bool | None
    positive_prompt: str | None
    negative_prompt: str | None
    prepend_bos: bool
    length_bucket: int
    text_tokens: int
    temperature: float
    top_p: float

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        if not isinstance(self.hw, (tuple, list)) or len(self.hw) != 2:
            raise SettingsError(f"sampling.hw must be (height, width), got {self.hw!r}")
        put("hw", tuple(_number("hw", v, int) for v in self.hw))
        for name in ("guidance_scale", "image_guidance_scale", "timesteps_shift", "last_step_size", "temperature",
                     "top_p"):
            put(name, _number(name, getattr(self, name), float))
        for name in ("num_steps", "length_bucket", "text_tokens"):
            put(name, _number(name, getattr(self, name), int))
        for name in ("positive_prompt", "negative_prompt"):
            _optional_text(name, getattr(self, name))
        for name, value, allowed in (("guidance_schedule", self.guidance_schedule, GUIDANCE_SCHEDULES),
                                     ("method", self.method, METHODS),
                                     ("time_grid", self.time_grid, (None, *GRIDS))):
            if value not in allowed:
                raise SettingsError(f"sampling.{name}={value!r}: choose from {allowed}")
        for name in ("use_norm", "prepend_bos"):
            value = getattr(self, name)
            if not isinstance(value, bool) and not (name == "use_norm" and value is None):
                raise SettingsError(f"sampling.{name} must be true or false, got {value!r}")
        for name, ok, need in (("num_steps", self.num_steps >= 1, ">= 1"),
                               ("timesteps_shift", self.timesteps_shift > 0, "> 0"),
                               ("last_step_size", 0 < self.last_step_size < 1, "in (0, 1)"),
                               ("length_bucket", self.length_bucket >= 1, ">= 1"),
                               ("text_tokens", self.text_tokens >= 0, ">= 0"),
                               ("temperature", self.temperature >= 0, ">= 0"),
                               ("top_p", 0 < self.top_p <= 1, "in (0, 1]")):
            if not ok:
                raise SettingsError(f"sampling.{name} must be {need}, got {getattr(self, name)}")
        cfg_mult_for(self.guidance_scale, self.image_guidance_scale)

    @classmethod
    def from_config(cls, section=None, **changes: Any) -> SamplingSettings:
        """From a ``sampling`` config section (default: the built-in ``configs.sampling_config()``) with
        ``changes`` applied; unknown fields are errors."""
        fields = dict((sampling_config() if section is None else section).items()) | changes
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise SettingsError(f"unknown sampling settings {unknown} (known: {sorted(known)})")
        return cls(**fields)

    @property
    def cfg_mult(self) -> int:
        return cfg_mult_for(self.guidance_scale, self.image_guidance_scale)

    def for_model(self, model_cfg) -> SamplingSettings:
        """These settings with ``time_grid`` and ``use_norm`` filled in from the model's release schema:
        NextStep-1.1 samples on its grid ending at t = 1 without token normalisation."""
        is_11 = model_cfg.schema == "1.1"
        return dataclasses.replace(
            self, time_grid=self.time_grid or ("nextstep1.1" if is_11 else "nextstep1"),
            use_norm=(not is_11) if self.use_norm is None else self.use_norm)


def read_stored_settings(folder: str | Path) -> dict | None:
    """The sampling settings kept in ``folder/sampling.json`` (None without that file), checked field by field."""
    path = Path(folder) / STORED_SETTINGS_FILE
    if not path.is_file():
        return None
    try:
        stored = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SettingsError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(stored, dict):
        raise SettingsError(f"{path}: expected a JSON object of sampling settings")
    if "hw" in stored and isinstance(stored["hw"], list):
        stored["hw"] = tuple(stored["hw"])
    try:
        SamplingSettings.from_config(**stored)
    except SettingsError as e:
        raise SettingsError(f"{path}: {e}") from None
    return stored
