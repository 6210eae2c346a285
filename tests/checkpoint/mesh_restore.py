"""Run on 8 fake CPU devices (XLA_FLAGS set by the caller): restore a converted checkpoint onto a
(fsdp=4, tensor=2) mesh and compare with the single-device restore. Prints one JSON line of findings."""

import json
import sys

import jax
import numpy as np
from flax import traverse_util

from nextstep_jax.checkpoint.orbax_io import ItemReader
from nextstep_jax.checkpoint.store import PARAMS_ITEM, abstract_params, restore_params
from nextstep_jax.sharding import make_mesh, shardings_of


def _whole_chunks(index: tuple[slice, ...], shape: tuple[int, ...], chunks: tuple[int, ...]) -> bool:
    """Whether a device's region starts and ends on chunk boundaries (so reading it reads no other data)."""
    for s, size, chunk in zip(index, shape, chunks):
        start, stop, _ = s.indices(size)
        if start % chunk or (stop % chunk and stop != size):
            return False
    return True


def check(path: str, mesh, scan_layers) -> dict:
    cfg, sharded = restore_params(path, mesh, scan_layers=scan_layers)
    _, single = restore_params(path, scan_layers=scan_layers)
    expected = traverse_util.flatten_dict(shardings_of(abstract_params("nextstep", cfg), mesh))
    sharded, single = traverse_util.flatten_dict(sharded), traverse_util.flatten_dict(single)
    item = ItemReader(f"{path}/{PARAMS_ITEM}")
    report = {"leaves": len(sharded), "value_mismatch": [], "sharding_mismatch": [], "bad_shard_shape": [],
              "foreign_chunks": [], "split_leaves": 0, "devices": jax.device_count()}
    for p, array in sharded.items():
        name = "/".join(p)
        if not np.array_equal(np.asarray(array), np.asarray(single[p])):
            report["value_mismatch"].append(name)
        if array.sharding != expected[p]:
            report["sharding_mismatch"].append(name)
        shard_shape = array.sharding.shard_shape(array.shape)
        if len(array.addressable_shards) != 8 or any(s.data.shape != shard_shape for s in array.addressable_shards):
            report["bad_shard_shape"].append(name)
        report["split_leaves"] += shard_shape != array.shape
        if scan_layers is None:  # stored layout: the device regions must be unions of stored chunks
            chunks = item.chunks(p)
            if not all(_whole_chunks(i, array.shape, chunks) for i in array.sharding.devices_indices_map(array.shape).values()):
                report["foreign_chunks"].append(name)
    q = sharded[("backbone", "layers", "self_attn", "q_proj", "kernel")] if cfg.scan_layers else \
        sharded[("backbone", "layers_0", "self_attn", "q_proj", "kernel")]
    report["q_spec"] = [a if a is None or isinstance(a, str) else list(a) for a in q.sharding.spec]
    report["q_shape"], report["q_shard_shape"] = list(q.shape), list(q.sharding.shard_shape(q.shape))
    return report


def main(path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    print(json.dumps({"stored": check(path, mesh, None), "per_layer": check(path, mesh, False)}))


if __name__ == "__main__":
    main(sys.argv[1])
