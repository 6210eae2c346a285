"""``python -m nextstep_jax.bench.gpu_check --smoke`` (the GPU check at tiny sizes on CPU): one run, its report's
byte counts, rooflines and paper comparison checked against closed forms of the architecture, the train
FLOPs bounded by closed forms, MFU against the measured matmul rate."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nextstep_jax.bench.gpu_check import SIZES

REPO = Path(__file__).resolve().parents[2]
SMOKE = SIZES["smoke"]
BF16 = 2
TOKEN_DIM = 16 * 2 * 2  # latent channels x patch^2
FREQ = 256  # the timestep embedder's sinusoid width


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "gpu_check.json"
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    run = subprocess.run([sys.executable, "-m", "nextstep_jax.bench.gpu_check", "--smoke", "--out", str(out)],
                         capture_output=True, text=True, env=env, cwd=REPO, timeout=1200)
    assert run.returncode == 0, run.stderr[-3000:]
    written = json.loads(out.read_text())
    assert json.loads(run.stdout) == written
    return written


def _backbone_params(h, layers, heads, kv, d, inter):
    per_layer = 2 * h + 3 * h * inter + (h * heads * d + heads * d) + 2 * (h * kv * d + kv * d) + heads * d * h
    return layers * per_layer + h


def _head_params(h, d, layers, t):
    """(once per token, every step) parameter counts of SimpleMLPAdaLN with mlp_ratio 1."""
    once = (FREQ * d + d + d * d + d) + (h * d + d) + layers * (d * 3 * d + 3 * d) + (d * 2 * d + 2 * d)
    per_step = (t * d + d) + layers * (2 * d + 2 * (d * d + d)) + (d * t + t)
    return once, per_step


def test_machine_figures(report):
    m = report["machine"]
    assert report["mode"] == "smoke" and report["backend"] == "cpu"
    assert m["matmul_bf16_tflops"] > 0 and m["matvec_bandwidth_gbs"] > 0 and m["copy_bandwidth_gbs"] > 0
    assert m["hbm_bandwidth_gbs"] == max(m["matvec_bandwidth_gbs"], m["copy_bandwidth_gbs"])
    assert m["datasheet_bf16_tflops"] is None  # no datasheet for a CPU


def test_generation_bytes_and_rooflines(report):
    g, sizes = report["results"]["generate"], SMOKE["generate"]
    mc = sizes["model"]
    h, steps = mc["hidden_size"], sizes["steps"]
    assert g["image_tokens"] == (sizes["hw"][0] // 16) * (sizes["hw"][1] // 16) and g["steps"] == steps
    decode = BF16 * (_backbone_params(h, mc["num_layers"], mc["num_heads"], mc["num_kv_heads"], mc["head_dim"],
                                      mc["intermediate_size"]) + 2 * (TOKEN_DIM * h) + h + TOKEN_DIM)
    once, per_step = (BF16 * n for n in _head_params(h, mc["fm_head_dim"], mc["fm_head_layers"], TOKEN_DIM))
    assert (g["decode_bytes_per_token"], g["head_bytes_once_per_token"], g["head_bytes_per_step"]) == \
        (decode, once, per_step)
    bandwidth = report["machine"]["hbm_bandwidth_gbs"] * 1e9
    assert g["roofline_ms_per_token"] == pytest.approx((decode + steps * (once + per_step)) / bandwidth * 1e3)
    assert g["roofline_ms_per_token_precomputed"] == pytest.approx((decode + once + steps * per_step) / bandwidth * 1e3)
    assert g["per_token_ms"] == pytest.approx(g["median_s"] / g["image_tokens"] * 1e3)
    assert g["per_token_vs_roofline"] == pytest.approx(g["per_token_ms"] / g["roofline_ms_per_token"])
    assert g["s_per_1024_tokens"] == pytest.approx(g["per_token_ms"] * 1.024)
    assert g["vs_paper_h100"] == pytest.approx(g["s_per_1024_tokens"] / 11.31)
    assert g["median_s"] > 0 and g["compile_s"] > 0


def test_train_flops_and_mfu(report):
    t, sizes = report["results"]["train"], SMOKE["train"]
    b, w = sizes["backbone"], sizes["train"]
    h, d, heads, layers = b["hidden"], w["fm_dim"], b["heads"], b["layers"]
    head_dim, seq, tokens = h // heads, w["seq"], w["batch"] * w["seq"]
    layer_mm = layers * (3 * h * b["intermediate"] + 2 * h * heads * head_dim + 2 * h * b["kv_heads"] * head_dim)
    cond = h * d
    head_mm = ((FREQ * d + d * d) + cond + TOKEN_DIM * d + w["fm_layers"] * (3 * d * d + 2 * d * d) + 2 * d * d
               + d * TOKEN_DIM)
    # The workload's count (training/flops.py) lies between the backbone's 6N alone and every part on every
    # position with dense attention.
    every_position = (2 * layer_mm + layers * 4 * seq * heads * head_dim + 2 * h * b["vocab"]
                      + 2 * (h * TOKEN_DIM + cond) + 2 * w["fm_head_batch_mul"] * (head_mm - cond) + 2 * TOKEN_DIM * h)
    assert 3 * tokens * 2 * layer_mm < t["flops"] <= 3 * tokens * every_position * (1 + 1e-9)
    peak = report["machine"]["matmul_bf16_tflops"] * 1e12
    assert t["mfu_vs_measured_bf16_matmul"] == pytest.approx(t["flops"] / t["step_median_s"] / peak)
    assert t["tokens_per_s"] == pytest.approx(tokens / t["step_median_s"])
    assert t["mfu_vs_datasheet_bf16"] is None and t["dtype"] == "bfloat16"
    assert t["last_step_loss"] > 0


def test_unknown_part_is_refused():
    run = subprocess.run([sys.executable, "-m", "nextstep_jax.bench.gpu_check", "--smoke", "--only", "generate,fly"],
                         capture_output=True, text=True, cwd=REPO, timeout=120)
    assert run.returncode == 2 and "--only generate,fly: unknown parts ['fly']" in run.stderr


def test_imports_without_grain():
    """The GPU machine has no grain: the check's modules must not need it."""
    block = ("import sys\n"
             "class NoGrain:\n"
             "    def find_spec(self, name, path=None, target=None):\n"
             "        if name.split('.')[0] in ('grain', 'array_record'):\n"
             "            raise ImportError(name)\n"
             "sys.meta_path.insert(0, NoGrain())\n"
             "import nextstep_jax.bench.gpu_check\n")
    run = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
