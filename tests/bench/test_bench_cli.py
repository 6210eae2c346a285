"""The benchmark CLI's config handling, and a tiny train workload's report (the measurements themselves are
not tests)."""

from __future__ import annotations

import json

import pytest

from nextstep_jax.bench.__main__ import add_official_comparison, bench_config, check_known, main
from nextstep_jax.configs import ConfigError, apply_overrides, merge, model_config
from nextstep_jax.training.flops import train_step_flops


def test_overrides_and_unknown_keys():
    merged = apply_overrides(bench_config(), ["threads=1", "fm_sample.batch=4"])
    assert merged.fm_sample.batch == 4 and merged.fm_sample.dim == 1536 and merged.threads == 1
    assert bench_config().fm_sample.batch == 16
    with pytest.raises(ConfigError, match="fm_sample.bogus: no such field"):
        apply_overrides(bench_config(), ["fm_sample.bogus=1"])
    with pytest.raises(ConfigError, match="config.fm_sample: unknown key 'bogus'"):
        check_known(merge(bench_config(), {"fm_sample": {"bogus": 1}}), bench_config())


@pytest.mark.parametrize("argv", [["--only", "nope"], ["--only", "train,nope"], ["--config.threads=many"],
                                  ["--config.threads=99"], ["--config.nope.x=1"], ["--config", "missing.py"],
                                  ["--only", "train", "--config.train.seq=8", "--config.train.image_tokens=7"]])
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


TINY_TRAIN = ["warmup=1", "repeats=1", "backbone.hidden=32", "backbone.layers=2", "backbone.heads=2",
              "backbone.kv_heads=1", "backbone.intermediate=64", "backbone.vocab=300", "train.batch=2",
              "train.seq=16", "train.image_tokens=4", "train.fm_dim=16", "train.fm_layers=1"]


def test_train_report_is_consistent():
    from nextstep_jax.bench import workloads

    config = apply_overrides(bench_config(), TINY_TRAIN).to_dict()
    machine = {"matmul_f32_gflops": 50.0, "mem_bandwidth_gbs": 10.0}
    result = json.loads(json.dumps(workloads.train(config, machine), default=float))
    for key in ("fwd_bwd_median_s", "step_median_s", "tokens_per_s", "mfu_vs_matmul_peak",
                "fwd_bwd_fraction_of_matmul_peak", "adamw_median_s", "adamw_fraction_of_step", "compile_s",
                "matmul_train_shape_gflops", "flops"):
        assert result[key] > 0, key
    # The FLOPs are the trainer's count for the model these sizes describe, rebuilt here from the config.
    t = config["train"]
    cfg = model_config(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2,
                       num_kv_heads=1, head_dim=16, fm_head_dim=16, fm_head_layers=1, fm_head_batch_mul=4)
    # Each row holds train.image_tokens image targets: the FM head's slots and the useful image work.
    flops = train_step_flops(cfg, t["batch"], t["seq"], image_targets=t["image_tokens"],
                             image_positions=t["image_tokens"])["model"]
    assert result["flops"] == pytest.approx(flops, rel=1e-12)
    step, fwd_bwd = result["step_median_s"], result["fwd_bwd_median_s"]
    assert result["tokens_per_s"] == pytest.approx(2 * 16 / step)
    assert result["fwd_bwd_fraction_of_matmul_peak"] == pytest.approx(flops / fwd_bwd / 1e9 / 50.0)
    assert result["mfu_vs_matmul_peak"] == pytest.approx(flops / step / 1e9 / 50.0)
    assert result["adamw_fraction_of_step"] == pytest.approx(result["adamw_median_s"] / step)
    assert result["fwd_bwd_fraction_of_train_shape_matmul"] == pytest.approx(
        flops / fwd_bwd / 1e9 / result["matmul_train_shape_gflops"])
    assert result["fwd_bwd_cpu_median_s"] > 0
    assert result["fwd_bwd_cpu_utilisation"] == pytest.approx(result["fwd_bwd_cpu_median_s"] / fwd_bwd)
    assert result["last_step_loss"] > 0
