"""The benchmark CLI's config handling (the measurements themselves are not tests)."""

from __future__ import annotations

import pytest

from nextstep_jax.bench.__main__ import add_official_comparison, bench_config, check_known, main
from nextstep_jax.configs import ConfigError, apply_overrides, merge


def test_overrides_and_unknown_keys():
    merged = apply_overrides(bench_config(), ["threads=1", "fm_sample.batch=4"])
    assert merged.fm_sample.batch == 4 and merged.fm_sample.dim == 1536 and merged.threads == 1
    assert bench_config().fm_sample.batch == 16
    with pytest.raises(ConfigError, match="fm_sample.bogus: no such field"):
        apply_overrides(bench_config(), ["fm_sample.bogus=1"])
    with pytest.raises(ConfigError, match="config.fm_sample: unknown key 'bogus'"):
        check_known(merge(bench_config(), {"fm_sample": {"bogus": 1}}), bench_config())


@pytest.mark.parametrize("argv", [["--only", "nope"], ["--only", "train"], ["--config.threads=many"],
                                  ["--config.threads=99"], ["--config.nope.x=1"], ["--config", "missing.py"]])
def test_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_config_file_may_not_add_fields(tmp_path, capsys):
    path = tmp_path / "b.py"
    path.write_text("import ml_collections\n\ndef get_config():\n"
                    "    return ml_collections.ConfigDict({'fm_sample': {'batchsize': 4}})\n")
    assert main(["--config", str(path)]) == 2
    assert "unknown key 'batchsize'" in capsys.readouterr().err


def test_official_comparison_only_for_default_sizes():
    report = {"config": bench_config().to_dict(),
              "results": {"fm_sample": {"median_s": 1.1}, "generate": {"per_token_ms": 310.0}}}
    report["config"]["backbone"]["layers"] = 2
    add_official_comparison(report)
    assert report["results"]["fm_sample"]["speedup_vs_official"] == pytest.approx([4.08 / 1.1, 4.71 / 1.1])
    assert "speedup_vs_official" not in report["results"]["generate"]
