"""The one CLI config path: config files, --config.a.b=value overrides and their precedence."""

import argparse

import ml_collections
import pytest

from nextstep_jax.configs import ConfigError, add_config_arguments, apply_overrides, load_config_file, merge, parse_args, resolve


def _base():
    return ml_collections.ConfigDict(dict(
        model=dict(hidden_size=64, dtype="float32", rope_theta=1e6, scan_layers=True, ch_mult=(1, 2)),
        sampling=dict(steps=50, note=None)))


def _parser():
    p = argparse.ArgumentParser(prog="tool")
    add_config_arguments(p)
    p.add_argument("--steps", type=int)
    return p


def _write(tmp_path, body, name="c.py"):
    path = tmp_path / name
    path.write_text("import ml_collections\n\ndef get_config():\n" + body)
    return path


def test_overrides_are_typed_by_the_existing_field():
    cfg = apply_overrides(_base(), ["model.hidden_size=128", "model.dtype=bfloat16", "model.rope_theta=10000",
                                    "model.scan_layers=false", "model.ch_mult=(1,1,2)", "sampling.note=[1, 2]"])
    assert cfg.model.hidden_size == 128 and cfg.model.dtype == "bfloat16"
    assert cfg.model.rope_theta == 10000.0 and isinstance(cfg.model.rope_theta, float)
    assert cfg.model.scan_layers is False and cfg.model.ch_mult == (1, 1, 2)
    assert cfg.sampling.note == [1, 2]
    assert _base().model.hidden_size == 64  # the input is not modified


@pytest.mark.parametrize("item, culprit", [
    ("model.hidden=3", "model.hidden"), ("optim.lr=1", "'optim'"), ("model.hidden_size=big", "hidden_size=big"),
    ("model.hidden_size=1.5", "expected int"), ("model.scan_layers=maybe", "true or false"), ("model", "a.b=value"),
    ("model.dtype.x=1", "'model.dtype'"), ("sampling=1", "is a section"),
])
def test_bad_override_names_the_key(item, culprit):
    with pytest.raises(ConfigError, match=culprit.replace("(", r"\(").replace(".", r"\.")):
        apply_overrides(_base(), [item])


def test_precedence_defaults_file_stored_overrides(tmp_path):
    path = _write(tmp_path, "    c = ml_collections.ConfigDict()\n"
                            "    c.model = ml_collections.ConfigDict(dict(hidden_size=96, dtype='bfloat16'))\n"
                            "    c.optim = ml_collections.ConfigDict(dict(lr=1e-4))\n    return c\n")
    args, overrides = parse_args(_parser(), ["--config", str(path), "--config.model.dtype=float32",
                                             "--config.sampling.steps", "7", "--steps", "3"])
    assert args.steps == 3 and overrides == ["model.dtype=float32", "sampling.steps=7"]
    cfg = resolve(args, overrides, default=_base(), stored={"model": {"hidden_size": 80}, "sampling": {"steps": 9}})
    assert cfg.model.hidden_size == 80  # stored beats the file, which beat the default 64
    assert cfg.model.dtype == "float32" and cfg.sampling.steps == 7  # overrides beat the file and the stored
    assert cfg.model.scan_layers is True and cfg.optim.lr == 1e-4  # untouched default; new section from the file


def test_merge_keeps_sections_apart():
    cfg = merge(_base(), {"model": {"hidden_size": 1}})
    assert cfg.model.hidden_size == 1 and cfg.model.dtype == "float32" and cfg.sampling.steps == 50


@pytest.mark.parametrize("body, culprit", [
    (None, "no such config file"), ("    return 3\n", "returned int"), ("    raise KeyError('x')\n", "KeyError"),
])
def test_bad_config_file_names_the_file(tmp_path, body, culprit):
    path = tmp_path / "missing.py" if body is None else _write(tmp_path, body)
    with pytest.raises(ConfigError, match=culprit) as err:
        load_config_file(path)
    assert str(path) in str(err.value)


def test_file_without_get_config(tmp_path):
    path = tmp_path / "empty.py"
    path.write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no get_config"):
        load_config_file(path)


def test_override_without_value_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_:
        parse_args(_parser(), ["--config.model.dtype"])
    assert exit_.value.code == 2 and "--config.model.dtype" in capsys.readouterr().err


def test_help_states_the_precedence(capsys):
    with pytest.raises(SystemExit):
        parse_args(_parser(), ["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "built-in defaults < --config FILE < settings stored with the model < --config.a.b=value" in text
