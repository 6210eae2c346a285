"""Benchmark CLI: ``python -m nextstep_jax.bench`` (contract: shared/design/BENCH.md).

    python -m nextstep_jax.bench --only fm_sample,backbone,generate --out bench.json
    python -m nextstep_jax.bench --json-config '{"threads": 1, "fm_sample": {"batch": 4}}'

One JSON object on stdout (and in ``--out``). The machine's float32 matmul throughput and memory bandwidth
are measured in the same run, so each figure is also a fraction of this machine's limit. Thread limits
must be in place before JAX starts, so this module imports JAX only after applying them.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
from pathlib import Path

DEFAULT_CONFIG = {
    "threads": 2, "warmup": 1, "repeats": 3, "seed": 0, "dtype": "float32",
    "fm_sample": {"dim": 1536, "layers": 12, "token_dim": 64, "cond_dim": 1024, "batch": 16, "cfg": 7.5,
                  "steps": 50, "timesteps_shift": 1.0},
    "backbone": {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 4, "intermediate": 2048, "vocab": 32000,
                 "batch": 1, "prefill": 256, "decode": 64},
    "train": {"batch": 2, "seq": 512, "image_tokens": 256, "fm_dim": 512, "fm_layers": 6, "fm_head_batch_mul": 4},
    "generate": {"hw": [64, 64], "caption": "a red circle on the left", "cfg": 7.5, "steps": 50,
                 "timesteps_shift": 1.0, "use_norm": True, "fm_dim": 1536, "fm_layers": 12, "vae_ch": 32,
                 "vae_ch_mult": [1, 2, 4, 4], "vae_res_blocks": 2},
}
AVAILABLE = ("fm_sample", "backbone", "generate")
# The official PyTorch code (stepfun-ai/NextStep-1 @ 6e49bae) on this kind of machine, 2 threads, float32, default
# sizes, measured 2026-11-29 under torch 2.13.0 CPU, eager and torch.compile'd: its FlowMatchingHead.sample, its
# NextStep.forward with a StaticCache, and NextStepPipeline.generate_image (README "Benchmarks").
# (result key, [low, high], unit).
OFFICIAL_PYTORCH = {
    "fm_sample": ("median_s", [4.08, 4.71], "s"),
    "backbone": ("decode_per_token_ms", [24.6, 28.0], "ms per token"),
    "generate": ("per_token_ms", [3127.0, 3237.0], "ms per image token (50.0-51.8 s per 64x64 image)"),
}
# Config sections a workload's figure depends on; the official figure only applies when all are default.
DEPENDS_ON = {"fm_sample": ("fm_sample",), "backbone": ("backbone",), "generate": ("generate", "backbone")}


def merge(base: dict, override: dict, where: str = "config") -> dict:
    """Deep-merge ``override`` into a copy of ``base``; unknown keys are errors."""
    out = copy.deepcopy(base)
    for key, value in override.items():
        if key not in base:
            raise ValueError(f"{where}: unknown key {key!r} (known: {sorted(base)})")
        if isinstance(base[key], dict):
            if not isinstance(value, dict):
                raise ValueError(f"{where}.{key}: expected an object")
            out[key] = merge(base[key], value, f"{where}.{key}")
        else:
            out[key] = value
    return out


def load_override(text: str | None) -> dict:
    if not text:
        return {}
    source = Path(text).read_text() if Path(text).is_file() else text
    try:
        override = json.loads(source)
    except json.JSONDecodeError as e:
        raise ValueError(f"--json-config is neither a file nor valid JSON: {e.msg}") from None
    if not isinstance(override, dict):
        raise ValueError("--json-config must be a JSON object")
    return override


def limit_threads(threads: int) -> dict:
    """Pin the process to ``threads`` CPUs and size XLA's and BLAS' pools; must run before JAX starts."""
    cpus = sorted(os.sched_getaffinity(0))
    if threads < 1 or threads > len(cpus):
        raise ValueError(f"threads={threads} but this process may use {len(cpus)} CPUs")
    os.sched_setaffinity(0, cpus[:threads])
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(threads)
    flags = os.environ.get("XLA_FLAGS", "")
    if threads == 1 and "xla_cpu_multi_thread_eigen" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_multi_thread_eigen=false".strip()
    return {"threads": threads, "cpus": cpus[:threads], "jax_already_imported": "jax" in sys.modules}


def add_official_comparison(report: dict) -> None:
    """Speed-up over the official figures, for workloads run with the default config."""
    config = report["config"]
    common = all(config[k] == DEFAULT_CONFIG[k] for k in ("threads", "dtype"))
    for name, result in report["results"].items():
        if common and all(config[k] == DEFAULT_CONFIG[k] for k in DEPENDS_ON[name]):
            key, reference, unit = OFFICIAL_PYTORCH[name]
            result["official_pytorch"] = {key: reference, "unit": unit,
                                          "source": "official code measured on this kind of machine"}
            result["speedup_vs_official"] = [r / result[key] for r in reference]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.bench", description=__doc__.split("\n")[0])
    p.add_argument("--json-config", help="overrides of the default config: inline JSON or a file")
    p.add_argument("--only", help=f"comma-separated workloads (default: {','.join(AVAILABLE)})")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    try:
        config = merge(DEFAULT_CONFIG, load_override(args.json_config))
        only = args.only.split(",") if args.only else list(AVAILABLE)
        unknown = [w for w in only if w not in DEFAULT_CONFIG or not isinstance(DEFAULT_CONFIG[w], dict)]
        if unknown:
            raise ValueError(f"unknown workloads {unknown}; choose from {list(AVAILABLE)}")
        missing = [w for w in only if w not in AVAILABLE]
        if missing:
            raise ValueError(f"workloads {missing} are not implemented yet (available: {list(AVAILABLE)})")
        threads = limit_threads(int(config["threads"]))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from nextstep_jax import bench_workloads

    report = bench_workloads.run(config, only, threads)
    add_official_comparison(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
