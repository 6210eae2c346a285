"""The benchmark CLI's config handling (the measurements themselves are not tests)."""

from __future__ import annotations

import copy

import pytest

from nextstep_jax.bench import DEFAULT_CONFIG, add_official_comparison, main, merge


def test_merge_overrides_and_rejects_unknown_keys():
    merged = merge(DEFAULT_CONFIG, {"threads": 1, "fm_sample": {"batch": 4}})
    assert merged["fm_sample"]["batch"] == 4 and merged["fm_sample"]["dim"] == 1536 and merged["threads"] == 1
    assert DEFAULT_CONFIG["fm_sample"]["batch"] == 16
    with pytest.raises(ValueError, match="unknown key 'bogus'"):
        merge(DEFAULT_CONFIG, {"fm_sample": {"bogus": 1}})


@pytest.mark.parametrize("argv", [["--only", "nope"], ["--only", "train"], ["--json-config", "{not json"],
                                  ["--json-config", '{"threads": 99}']])
def test_bad_arguments_exit_2(argv, capsys):
    assert main(argv) == 2
    assert capsys.readouterr().err.startswith("error:")


def test_official_comparison_only_for_default_sizes():
    report = {"config": copy.deepcopy(DEFAULT_CONFIG),
              "results": {"fm_sample": {"median_s": 1.1}, "generate": {"per_token_ms": 310.0}}}
    report["config"]["backbone"]["layers"] = 2
    add_official_comparison(report)
    assert report["results"]["fm_sample"]["speedup_vs_official"] == pytest.approx([4.08 / 1.1, 4.71 / 1.1])
    assert "speedup_vs_official" not in report["results"]["generate"]
