"""Sampling settings: the guidance layout, validation naming the field, a model folder's sampling.json."""

from __future__ import annotations

import json

import pytest

from nextstep_jax.configs import model_config, sampling_config
from nextstep_jax.generation.settings import SamplingSettings, SettingsError, cfg_mult_for, read_stored_settings


def test_cfg_mult():
    assert [cfg_mult_for(1, 1), cfg_mult_for(7.5, 1), cfg_mult_for(7.5, 2), cfg_mult_for(0.5, 1)] == [1, 2, 3, 2]


def test_settings_mirror_the_config_section():
    settings = SamplingSettings.from_config()
    assert {k: getattr(settings, k) for k in sampling_config()} == sampling_config().to_dict()
    assert SamplingSettings.from_config(sampling_config(num_steps=7)).num_steps == 7


@pytest.mark.parametrize("changes,culprit", [
    (dict(num_steps=0), "sampling.num_steps must be >= 1"), (dict(top_p=0.0), "sampling.top_p"),
    (dict(method="dpm"), "sampling.method='dpm'"), (dict(hw=(64,)), "sampling.hw"),
    (dict(guidance_scale="high"), "sampling.guidance_scale must be a number"),
    (dict(use_norm="yes"), "sampling.use_norm must be true or false"), (dict(steps=3), "unknown sampling settings"),
])
def test_bad_settings_name_the_field(changes, culprit):
    with pytest.raises(SettingsError, match=culprit.replace("(", r"\(")):
        SamplingSettings.from_config(**changes)


def test_model_schema_fills_grid_and_norm():
    settings = SamplingSettings.from_config()
    assert (settings.time_grid, settings.use_norm) == (None, None)
    v1, v11 = settings.for_model(model_config()), settings.for_model(model_config(schema="1.1"))
    assert (v1.time_grid, v1.use_norm, v11.time_grid, v11.use_norm) == ("nextstep1", True, "nextstep1.1", False)
    explicit = SamplingSettings.from_config(time_grid="nextstep1", use_norm=True).for_model(model_config(schema="1.1"))
    assert (explicit.time_grid, explicit.use_norm) == ("nextstep1", True)


def test_stored_settings(tmp_path):
    assert read_stored_settings(tmp_path) is None
    (tmp_path / "sampling.json").write_text(json.dumps({"timesteps_shift": 3.2, "hw": [256, 512]}))
    assert read_stored_settings(tmp_path) == {"timesteps_shift": 3.2, "hw": (256, 512)}
    for text, culprit in (("{oops", "not valid JSON"), ("[1]", "JSON object"), ('{"cfg": 2}', "unknown"),
                          ('{"num_steps": -1}', "num_steps")):
        (tmp_path / "sampling.json").write_text(text)
        with pytest.raises(SettingsError, match=culprit) as err:
            read_stored_settings(tmp_path)
        assert str(tmp_path / "sampling.json") in str(err.value)
