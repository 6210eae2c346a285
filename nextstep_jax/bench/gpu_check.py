"""The one-shot GPU check (``scripts/gpu_check.sh`` runs it on a lent H200):
``python -m nextstep_jax.bench.gpu_check [--smoke] [--out FILE]``.

In one run, on the default device:
  machine   the bf16 matmul rate (8192^3) and the HBM bandwidth (a bf16 matrix-vector product and a copy, each
            over 4 GiB; the better one is the bandwidth the rooflines use)
  generate  the NextStep-1-Large (14B) architecture with random bf16 weights and the released VAE's
            architecture generating one 512x512 image (1024 image tokens, text CFG 7.5 on 2 rows, 50 SDE steps
            per token, use_norm) through ``generation.Generator``, as a user runs it. Per image token against two
            weight-streaming rooflines (bytes / HBM bandwidth): ``roofline_ms_per_token`` streams the backbone
            (less its embedding and LM head) and the whole flow-matching head at every step, as the benchmark
            contract defines it; ``roofline_ms_per_token_precomputed`` streams the head's modulation and
            condition weights once per token and only its x-path (input projection, block norms and MLPs,
            final linear) at every step, which is what ``fm_sampler.sample_head`` does. Also against the
            paper's 11.31 s per 1024 image tokens on an H100 (80 GB at 3.35 TB/s against the H200's 4.8).
  train     ``bench.workloads.train``, the benchmark's train workload, on a ~1.4B model (hidden 2048 x 16 layers,
            the 152k vocabulary; 0.75B without embeddings) with the full-size flow-matching head, bf16 compute:
            8 rows x 2048 tokens with one 1024-token image each; MFU against the measured bf16 matmul rate and
            against the chip's datasheet dense bf16 peak.

One JSON object on stdout and in ``--out``, rewritten after each part, so a run cut short keeps what it
measured. ``--smoke`` runs every part at tiny sizes (CPU, CI). Nothing here imports grain.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
from flax import linen as nn

from nextstep_jax.bench import workloads
from nextstep_jax.configs import model_config, vae_config
from nextstep_jax.generation.generator import Generator
from nextstep_jax.generation.prompts import PromptTokenizer
from nextstep_jax.generation.settings import SamplingSettings
from nextstep_jax.models.nextstep import abstract_variables
from nextstep_jax.models.vae import AutoencoderKL
from nextstep_jax.training.chips import peak_flops_of

PAPER_H100_S_PER_1024_TOKENS = 11.31
CAPTION = "a red fox sitting in fresh snow, soft morning light"
# The head's weights that depend on (t, c) only: fm_sampler.sample_head applies them once per token.
PER_TOKEN_HEAD_MODULES = ("adaLN_modulation", "time_embed", "cond_embed")

SIZES = {
    "full": {
        "machine": {"matmul": 8192, "stream_bytes": 4 * 2**30, "runs": 10},
        "generate": {"model": {}, "vae": {}, "hw": [512, 512], "cfg": 7.5, "steps": 50, "warmup": 1, "repeats": 1},
        "train": {"backbone": {"hidden": 2048, "layers": 16, "heads": 16, "kv_heads": 8, "intermediate": 5632,
                               "vocab": 152064},
                  "train": {"batch": 8, "seq": 2048, "image_tokens": 1024, "fm_dim": 1536, "fm_layers": 12,
                            "fm_head_batch_mul": 4},
                  "warmup": 1, "repeats": 3},
    },
    "smoke": {
        "machine": {"matmul": 256, "stream_bytes": 8 * 2**20, "runs": 2},
        "generate": {"model": {"vocab_size": 512, "hidden_size": 64, "intermediate_size": 128, "num_layers": 2,
                               "num_heads": 4, "num_kv_heads": 2, "head_dim": 16, "fm_head_dim": 32,
                               "fm_head_layers": 2},
                     "vae": {"ch": 32, "ch_mult": (1, 1, 1, 1), "num_res_blocks": 1},
                     "hw": [32, 32], "cfg": 7.5, "steps": 3, "warmup": 1, "repeats": 1},
        "train": {"backbone": {"hidden": 64, "layers": 2, "heads": 4, "kv_heads": 2, "intermediate": 128,
                               "vocab": 512},
                  "train": {"batch": 2, "seq": 64, "image_tokens": 16, "fm_dim": 32, "fm_layers": 2,
                            "fm_head_batch_mul": 2},
                  "warmup": 1, "repeats": 1},
    },
}


def _nbytes(tree) -> int:
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def measure_machine(sizes: dict) -> dict:
    n, runs = sizes["matmul"], sizes["runs"]
    key = jax.random.key(0)
    a, b = jax.random.normal(key, (2, n, n), jnp.bfloat16)
    matmul = jax.jit(jnp.matmul)
    matmul_flops = 2 * n**3 / workloads._best(lambda: matmul(a, b), runs)
    del a, b
    cols = 8192
    big = jax.random.normal(key, (sizes["stream_bytes"] // (2 * cols), cols), jnp.bfloat16)
    vec = jnp.ones((cols,), jnp.bfloat16)
    matvec = big.nbytes / workloads._best(lambda: matmul(big, vec), runs)
    copy = jax.jit(lambda x: x + 1)
    copied = 2 * big.nbytes / workloads._best(lambda: copy(big), runs)  # read and write
    del big
    kind = jax.devices()[0].device_kind
    peak = peak_flops_of(kind)
    return {"device_kind": kind, "matmul_bf16_tflops": matmul_flops / 1e12, "matmul_size": n,
            "matvec_bandwidth_gbs": matvec / 1e9, "copy_bandwidth_gbs": copied / 1e9,
            "hbm_bandwidth_gbs": max(matvec, copied) / 1e9, "stream_bytes": sizes["stream_bytes"],
            "datasheet_bf16_tflops": None if peak is None else peak / 1e12}


def random_bf16(boxed_shapes, key):
    """Random weights in bfloat16 straight from abstract variables (no float32 copy of a 14B model)."""
    shapes = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, jnp.bfloat16), nn.unbox(boxed_shapes)["params"])
    return workloads.randomize(shapes, key)


def _head_split(head) -> tuple[int, int]:
    """(bytes applied once per token, bytes applied at every step) of the flow-matching head's params."""
    flat = jax.tree_util.tree_flatten_with_path(head)[0]
    once = sum(x.size * x.dtype.itemsize for path, x in flat
               if any(m in jax.tree_util.keystr(path) for m in PER_TOKEN_HEAD_MODULES))
    return once, _nbytes(head) - once


def generate(sizes: dict, machine: dict) -> dict:
    key = jax.random.key(0)
    with tempfile.TemporaryDirectory() as tmp:
        tok = PromptTokenizer(workloads._byte_tokenizer(Path(tmp)))
    sp = tok.special
    cfg = model_config(**sizes["model"], dtype="bfloat16", scan_layers=False, boi=sp.boi, eoi=sp.eoi,
                       image_placeholder_id=sp.placeholder, pad_token_id=sp.pad, bos_token_id=sp.eos,
                       eos_token_id=sp.eos)
    vcfg = vae_config(**sizes["vae"], z_channels=cfg.latent_channels, dtype="bfloat16")
    start = time.perf_counter()
    params = random_bf16(abstract_variables(cfg), key)
    vae_params = random_bf16(jax.eval_shape(lambda: AutoencoderKL(vcfg).init(key, jnp.zeros((1, 32, 32, 3)))), key)
    gen = Generator(cfg, params, vcfg, vae_params, tok, donate=True)
    del params
    jax.block_until_ready(gen.variables)
    init_s = time.perf_counter() - start
    weights = gen.variables["params"]
    settings = SamplingSettings.from_config(hw=tuple(sizes["hw"]), guidance_scale=sizes["cfg"],
                                            num_steps=sizes["steps"], timesteps_shift=1.0, use_norm=True,
                                            length_bucket=1)
    seeds = iter(range(1 << 30))
    first, median = workloads._timed(lambda: gen.generate([CAPTION], settings, seed=next(seeds)).images,
                                     sizes["warmup"], sizes["repeats"])
    tokens = gen.prompts.num_image_tokens(settings)
    steps = sizes["steps"]
    head_once, head_per_step = _head_split(weights["image_head"])
    decode = _nbytes({k: v for k, v in weights.items() if k not in ("image_head", "embed_tokens", "lm_head")})
    bandwidth = machine["hbm_bandwidth_gbs"] * 1e9
    roofline_ms = (decode + steps * (head_once + head_per_step)) / bandwidth * 1e3
    precomputed_ms = (decode + head_once + steps * head_per_step) / bandwidth * 1e3
    per_token_ms = median / tokens * 1e3
    s_per_1024 = per_token_ms * 1024 / 1e3
    stats = jax.devices()[0].memory_stats() or {}
    return {"median_s": median, "compile_s": first - median, "init_s": init_s, "image_tokens": tokens,
            "steps": steps, "hw": list(settings.hw), "rows": 2, "per_token_ms": per_token_ms,
            "params": sum(x.size for x in jax.tree.leaves(weights)), "param_bytes": _nbytes(weights),
            "decode_bytes_per_token": decode, "head_bytes": head_once + head_per_step,
            "head_bytes_once_per_token": head_once, "head_bytes_per_step": head_per_step,
            "bandwidth_gbs": machine["hbm_bandwidth_gbs"],
            "roofline_ms_per_token": roofline_ms, "per_token_vs_roofline": per_token_ms / roofline_ms,
            "roofline_ms_per_token_precomputed": precomputed_ms,
            "per_token_vs_roofline_precomputed": per_token_ms / precomputed_ms,
            "s_per_1024_tokens": s_per_1024, "paper_h100_s_per_1024_tokens": PAPER_H100_S_PER_1024_TOKENS,
            "vs_paper_h100": s_per_1024 / PAPER_H100_S_PER_1024_TOKENS,
            "peak_device_bytes": stats.get("peak_bytes_in_use")}


def train(sizes: dict, machine: dict) -> dict:
    config = {"train": sizes["train"], "backbone": sizes["backbone"], "dtype": "bfloat16", "seed": 0,
              "warmup": sizes["warmup"], "repeats": sizes["repeats"]}
    peak = machine["matmul_bf16_tflops"] * 1e12
    # The workload divides by the "matmul peak" it is given: here the bf16 rate measured in this run.
    result = workloads.train(config, {"matmul_f32_gflops": peak / 1e9})
    result["mfu_vs_measured_bf16_matmul"] = result.pop("mfu_vs_matmul_peak")
    result["fwd_bwd_fraction_of_measured_bf16_matmul"] = result.pop("fwd_bwd_fraction_of_matmul_peak")
    datasheet = machine["datasheet_bf16_tflops"]
    result["mfu_vs_datasheet_bf16"] = (result["flops"] / result["step_median_s"] / (datasheet * 1e12)
                                       if datasheet else None)
    result.update(rows=sizes["train"]["batch"], seq=sizes["train"]["seq"], dtype="bfloat16")
    return result


def _write(report: dict, out: Path | None) -> None:
    text = json.dumps(report, indent=2, default=float)
    if out:
        tmp = out.with_suffix(out.suffix + ".tmp")
        tmp.write_text(text + "\n")
        tmp.replace(out)
    return text


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.bench.gpu_check", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny sizes (CPU, CI)")
    p.add_argument("--only", default="generate,train", help="comma-separated parts after machine")
    p.add_argument("--out", type=Path, help="also write the JSON here (rewritten after each part)")
    args = p.parse_args(argv)
    parts = [w for w in args.only.split(",") if w]
    unknown = sorted(set(parts) - {"generate", "train"})
    if unknown:
        print(f"gpu_check: --only {args.only}: unknown parts {unknown} (choose from generate, train)", file=sys.stderr)
        return 2
    mode = "smoke" if args.smoke else "full"
    sizes = SIZES[mode]
    start = time.perf_counter()
    report = {"impl": "nextstep_jax", "check": "gpu_check", "mode": mode, "jax": jax.__version__,
              "backend": jax.default_backend(), "sizes": sizes, "results": {}}
    report["machine"] = measure_machine(sizes["machine"])
    _write(report, args.out)
    for part, fn in (("generate", generate), ("train", train)):
        if part in parts:
            report["results"][part] = fn(sizes[part], report["machine"])
            report["wall_s"] = time.perf_counter() - start
            _write(report, args.out)
    print(_write(report, args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
