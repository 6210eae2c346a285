"""Run on 8 fake CPU devices (XLA_FLAGS set by the caller): load_model / load_vae onto a (fsdp=4, tensor=2)
mesh from a release folder and a converted checkpoint, in each layout, and compare with the single-device
load. Prints one JSON line of findings per load."""

import json
import sys
from pathlib import Path

import jax
import numpy as np
from flax import traverse_util

from nextstep_jax.checkpoint import load_model, load_vae
from nextstep_jax.checkpoint.converted.store import abstract_params
from nextstep_jax.sharding import make_mesh, shardings_of

LOADS = {"scanned": {"layers": "scanned"}, "unrolled": {"layers": "unrolled"},
         "unrolled fused": {"layers": "unrolled", "fused": True}}


def leaf_report(kind: str, cfg, sharded: dict, single: dict, mesh) -> dict:
    """Per-leaf findings for params loaded onto ``mesh`` against the same params loaded on one device."""
    expected = traverse_util.flatten_dict(shardings_of(abstract_params(kind, cfg), mesh))
    sharded, single = traverse_util.flatten_dict(sharded), traverse_util.flatten_dict(single)
    report = {"leaves": len(sharded), "value_mismatch": [], "sharding_mismatch": [], "bad_shard_shape": [],
              "split_leaves": 0, "devices": jax.device_count()}
    assert sharded.keys() == expected.keys() == single.keys()
    for p, array in sharded.items():
        name = "/".join(p)
        if not np.asarray(array).tobytes() == np.asarray(single[p]).tobytes():
            report["value_mismatch"].append(name)
        if array.sharding != expected[p]:
            report["sharding_mismatch"].append(name)
        shard_shape = array.sharding.shard_shape(array.shape)
        if len(array.addressable_shards) != 8 or any(s.data.shape != shard_shape for s in array.addressable_shards):
            report["bad_shard_shape"].append(name)
        report["split_leaves"] += shard_shape != array.shape
    return report


def check(kind: str, load, mesh) -> dict:
    cfg, sharded = load(mesh=mesh)
    report = leaf_report(kind, cfg, sharded, load()[1], mesh)
    sharded = traverse_util.flatten_dict(sharded)
    if kind == "nextstep":
        layer = ("backbone", "layers" if cfg.scan_layers else "layers_0", "self_attn")
        q = sharded[(*layer, "qkv_proj", "kernel")] if cfg.fused_qkv else sharded[(*layer, "q_proj", "kernel")]
        report["q_spec"] = [a if a is None or isinstance(a, str) else list(a) for a in q.sharding.spec]
    return report


def main(golden_dir: str, converted: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    sources = {"release": Path(golden_dir) / "model", "scanned": Path(converted) / "scanned"}
    report = {}
    for source, path in sources.items():
        for name, options in LOADS.items():
            load = lambda p=path, o=options, **kw: load_model(p, **o, **kw)  # noqa: E731
            report[f"{source} {name}"] = check("nextstep", load, mesh)
    report["vae release"] = check("vae", lambda **kw: load_vae(Path(golden_dir) / "vae", **kw), mesh)
    report["vae converted"] = check("vae", lambda **kw: load_vae(Path(converted) / "vae", **kw), mesh)
    print(json.dumps(report))


if __name__ == "__main__":
    main(*sys.argv[1:])
