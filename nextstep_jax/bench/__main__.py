"""Benchmark CLI: ``python -m nextstep_jax.bench``.

    python -m nextstep_jax.bench --only fm_sample,backbone,train,generate --out bench.json
    python -m nextstep_jax.bench --config.threads=1 --config.fm_sample.batch=4
    python -m nextstep_jax.bench --config my_bench.py   # get_config() returning some of the fields below

One JSON object on stdout (and in ``--out``): the effective config, the machine's float32 matmul throughput
and memory bandwidth measured in the same run (so each figure is also a fraction of this machine's limit),
and one result per workload. The config fields and the report keys are a contract shared with other
implementations measured on the same machine (docs/benchmarks.md); ``cfg`` there is the guidance scale, as
in the official code. Thread limits must be in place before JAX starts, so JAX is imported only after them;
the program first restarts itself once with huge pages for the heap (``nextstep_jax/host_memory.py``;
``NEXTSTEP_HUGE_PAGES=0`` turns that off), and the report's ``thread_limit.glibc_tunables`` says how it ran.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import ml_collections

from nextstep_jax import configs, host_memory


def bench_config() -> ml_collections.ConfigDict:
    """The default workloads and their sizes."""
    return ml_collections.ConfigDict({
        "threads": 2, "warmup": 1, "repeats": 3, "seed": 0, "dtype": "float32",
        "fm_sample": {"dim": 1536, "layers": 12, "token_dim": 64, "cond_dim": 1024, "batch": 16, "cfg": 7.5,
                      "steps": 50, "timesteps_shift": 1.0},
        "backbone": {"hidden": 768, "layers": 12, "heads": 12, "kv_heads": 4, "intermediate": 2048, "vocab": 32000,
                     "batch": 1, "prefill": 256, "decode": 64},
        "train": {"batch": 2, "seq": 512, "image_tokens": 256, "fm_dim": 512, "fm_layers": 6,
                  "fm_head_batch_mul": 4},
        "generate": {"hw": [64, 64], "caption": "a red circle on the left", "cfg": 7.5, "steps": 50,
                     "timesteps_shift": 1.0, "use_norm": True, "fm_dim": 1536, "fm_layers": 12, "vae_ch": 32,
                     "vae_ch_mult": [1, 2, 4, 4], "vae_res_blocks": 2},
    })


AVAILABLE = ("fm_sample", "backbone", "train", "generate")
# The official PyTorch code (stepfun-ai/NextStep-1 @ 6e49bae) on this kind of machine, 2 threads, float32, default
# sizes, measured 2026-11-29 under torch 2.13.0 CPU, eager and torch.compile'd: its FlowMatchingHead.sample, its
# NextStep.forward with a StaticCache, NextStepPipeline.generate_image, and one training step of its loss with
# torch AdamW (README "Benchmarks").
# (result key, [low, high], unit).
OFFICIAL_PYTORCH = {
    "fm_sample": ("median_s", [4.08, 4.71], "s"),
    "backbone": ("decode_per_token_ms", [24.6, 28.0], "ms per token"),
    "train": ("step_median_s", [4.81, 5.24], "s per step (forward+backward 3.96-4.11 s, AdamW ~1.1 s)"),
    "generate": ("per_token_ms", [3127.0, 3237.0], "ms per image token (50.0-51.8 s per 64x64 image)"),
}
# Config sections a workload's figure depends on; the official figure only applies when all are default.
DEPENDS_ON = {"fm_sample": ("fm_sample",), "backbone": ("backbone",), "train": ("train", "backbone"),
              "generate": ("generate", "backbone")}


def check_known(config, default, where: str = "config") -> None:
    """Every key of ``config`` must be one of ``default``'s (a config file may not add fields)."""
    for key, value in config.items():
        if key not in default:
            raise configs.ConfigError(f"{where}: unknown key {key!r} (known: {sorted(default)})")
        if isinstance(default[key], ml_collections.ConfigDict):
            if not isinstance(value, ml_collections.ConfigDict):
                raise configs.ConfigError(f"{where}.{key}: expected a section")
            check_known(value, default[key], f"{where}.{key}")


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
    return {"threads": threads, "cpus": cpus[:threads], "jax_already_imported": "jax" in sys.modules,
            "glibc_tunables": os.environ.get("GLIBC_TUNABLES")}  # host_memory's huge pages, when set


def add_official_comparison(report: dict) -> None:
    """Speed-up over the official figures, for workloads run with the default config."""
    config, default = report["config"], bench_config().to_dict()
    common = all(config[k] == default[k] for k in ("threads", "dtype"))
    for name, result in report["results"].items():
        if common and all(config[k] == default[k] for k in DEPENDS_ON[name]):
            key, reference, unit = OFFICIAL_PYTORCH[name]
            result["official_pytorch"] = {key: reference, "unit": unit,
                                          "source": "official code measured on this kind of machine"}
            result["speedup_vs_official"] = [r / result[key] for r in reference]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    configs.add_config_arguments(p)
    p.add_argument("--only", help=f"comma-separated workloads (default: {','.join(AVAILABLE)})")
    p.add_argument("--out", help="also write the JSON here")
    args, overrides = configs.parse_args(p, argv)
    try:
        config = configs.resolve(args, overrides, default=bench_config())
        check_known(config, bench_config())
        only = args.only.split(",") if args.only else list(AVAILABLE)
        unknown = [w for w in only if w not in AVAILABLE]
        if unknown:
            raise ValueError(f"unknown workloads {unknown}; choose from {list(AVAILABLE)}")
        if config.train.image_tokens + 2 > config.train.seq:
            raise ValueError(f"config.train.image_tokens={config.train.image_tokens} plus <boi> and <eoi> does "
                             f"not fit config.train.seq={config.train.seq}")
        threads = limit_threads(int(config.threads))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    from nextstep_jax.bench import workloads

    report = workloads.run(config.to_dict(), only, threads)
    add_official_comparison(report)
    text = json.dumps(report, indent=2)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    host_memory.restart_with_huge_pages()
    sys.exit(main())
