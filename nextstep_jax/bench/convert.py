"""Benchmark (not a test) of checkpoint conversion on a synthetic multi-shard float32 release.

    python -m nextstep_jax.bench.convert [--size-gb 3] [--max-shard-size 500MB] [--workdir DIR] [--out FILE]

Synthesises a NextStep release of about ``--size-gb`` (Qwen2-style dims: hidden 2048, vocab 49152, so the
largest tensors, embed_tokens and lm_head, are 403 MB each), then runs ``python -m nextstep_jax.convert``
import, export and verify on it, each in a child process whose peak RSS is read with ``os.wait4``. Reports
MB/s (release bytes / wall time of the child, interpreter start included) and peak RSS against the bound
3 x largest tensor + 300 MB. Disk use peaks at about 2 x ``--size-gb``: the synthetic release is deleted once
imported. Everything is removed at the end. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from nextstep_jax.checkpoint.conversion import parse_size
from nextstep_jax.checkpoint.mapping import nextstep_table
from nextstep_jax.checkpoint.release.config import model_config_from_release
from nextstep_jax.checkpoint.release.safetensors import TensorSpec, write_sharded

HIDDEN, VOCAB, INTERMEDIATE, HEADS, KV_HEADS, HEAD_DIM = 2048, 49152, 5632, 16, 4, 128


def release_config(num_layers: int) -> dict:
    """A 1.0-schema config.json with the benchmark's dims."""
    return {
        "architectures": ["NextStep"], "model_type": "nextstep", "torch_dtype": "float32",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": INTERMEDIATE,
        "num_hidden_layers": num_layers, "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS,
        "head_dim": HEAD_DIM, "attention_bias": True, "o_attention_bias": False, "mlp_bias": False,
        "rms_norm_eps": 1e-5, "rope_theta": 1000000.0, "tie_word_embeddings": False,
        "latent_channels": 16, "latent_patch_size": 2, "fm_head_dim": 512, "fm_head_layers": 2,
        "fm_head_batch_mul": 4, "boi": VOCAB - 3, "eoi": VOCAB - 2, "image_placeholder_id": VOCAB - 1,
        "pad_token_id": VOCAB - 4, "bos_token_id": 0, "eos_token_id": 0, "use_gen_pos_embed": False,
    }


def _tensor_bytes(num_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    cfg = model_config_from_release(release_config(num_layers))
    return [("gen_pos_embed", (1, 1024, HIDDEN))] + [(e.torch_key, e.torch_shape) for e in nextstep_table(cfg)]


def _release_bytes(num_layers: int) -> int:
    return sum(4 * math.prod(s) for _, s in _tensor_bytes(num_layers))


def num_layers_for(size_bytes: int) -> int:
    """Decoder layers of the release closest to ``size_bytes``; ValueError if that is not within half a layer
    of it, i.e. below the one-layer release (the embeddings and LM head alone are 806 MB at these dims)."""
    smallest = _release_bytes(1)
    per_layer = _release_bytes(2) - smallest
    if not size_bytes >= smallest - per_layer / 2:  # also rejects nan
        raise ValueError(f"--size-gb {size_bytes / 1e9:g}: the smallest release of the benchmark's dims (one "
                         f"layer) is {smallest / 1e9:.2f} GB")
    return max(1, round((size_bytes - smallest) / per_layer) + 1)


def synthesise(folder: Path, size_bytes: int, max_shard_size: int) -> tuple[int, int]:
    """Write the release; returns (total bytes, largest tensor bytes)."""
    num_layers = num_layers_for(size_bytes)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(release_config(num_layers), indent=2, sort_keys=True) + "\n")
    (folder / "tokenizer_config.json").write_text("{}\n")
    tensors = _tensor_bytes(num_layers)

    def produce(i: int, shape: tuple[int, ...]) -> np.ndarray:
        return np.random.default_rng(i).standard_normal(shape, dtype=np.float32)

    specs = [TensorSpec(key, shape, np.float32, lambda i=i, s=shape: produce(i, s))
             for i, (key, shape) in enumerate(tensors)]
    write_sharded(folder, specs, max_shard_size, metadata={"format": "pt"})
    return sum(4 * math.prod(s) for _, s in tensors), max(4 * math.prod(s) for _, s in tensors)


# Peak RSS is read inside the child from VmHWM: ru_maxrss from wait4 would include the parent's RSS, which
# the kernel carries over into a child's maxrss at exec.
_CHILD = """
import sys
from nextstep_jax.convert import main
code = main(sys.argv[1:]) if len(sys.argv) > 1 else 0  # no arguments: the baseline
with open("/proc/self/status") as f:
    print("VmHWM_kB", next(l.split()[1] for l in f if l.startswith("VmHWM")))
sys.exit(code)
"""


def _child(args: list[str]) -> dict:
    """Run the convert CLI with ``args`` in a fresh interpreter; wall time, peak RSS, exit code, its summary."""
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - start
    lines = out.stdout.strip().splitlines()
    if out.returncode not in (0, 1) or not lines or not lines[-1].startswith("VmHWM_kB"):
        raise RuntimeError(f"convert {' '.join(args)} failed ({out.returncode}): {out.stderr[-2000:]}")
    return {"seconds": round(seconds, 2), "peak_rss_mib": round(int(lines[-1].split()[1]) / 1024, 1),
            "exit_code": out.returncode, "output": lines[-2] if len(lines) > 1 else ""}


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nextstep_jax.bench.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-gb", type=float, default=3.0, help="synthetic release size (default 3)")
    parser.add_argument("--max-shard-size", type=parse_size, default=parse_size("500MB"))
    parser.add_argument("--workdir", type=Path, default=None, help="where to put the temporary files")
    parser.add_argument("--out", type=Path, default=None, help="also write the JSON report here")
    args = parser.parse_args(argv)
    try:
        num_layers_for(args.size_gb * 1e9)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    work = Path(tempfile.mkdtemp(prefix="convert_bench.", dir=args.workdir))
    try:
        release, checkpoint, exported = work / "release", work / "checkpoint", work / "exported"
        start = time.perf_counter()
        total, largest = synthesise(release, int(args.size_gb * 1e9), args.max_shard_size)
        synth_s = time.perf_counter() - start
        shards = len(list(release.glob("model-*.safetensors")))
        baseline = _child([])
        steps = {"import": _child(["import", str(release), str(checkpoint), "--quiet"])}
        checkpoint_bytes = _du(checkpoint)
        shutil.rmtree(release)
        steps["export"] = _child(["export", str(checkpoint), str(exported), "--quiet"])
        steps["verify"] = _child(["verify", str(exported), str(checkpoint), "--quiet"])
        bound_mib = (3 * largest) / 2**20 + 300
        for step in steps.values():
            step["mb_per_s"] = round(total / 1e6 / step["seconds"], 1)
            step["within_bound"] = step["peak_rss_mib"] < bound_mib
        report = {
            "command": "python -m nextstep_jax.bench.convert " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
            "release": {"bytes": total, "shards": shards, "largest_tensor_bytes": largest,
                        "synthesis_s": round(synth_s, 1)},
            "checkpoint_bytes_on_disk": checkpoint_bytes,
            "interpreter_baseline_rss_mib": baseline["peak_rss_mib"],
            "rss_bound_mib": round(bound_mib, 1),
            "steps": steps,
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    ok = all(s["exit_code"] == 0 and s["within_bound"] for s in steps.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
