"""Run on 8 fake CPU devices (XLA_FLAGS set by the caller): restore a converted checkpoint onto a
(fsdp=4, tensor=2) mesh and compare with the single-device restore. Prints one JSON line of findings."""

import json
import sys

import jax
from flax import traverse_util
from mesh_loading import leaf_report

from nextstep_jax.checkpoint.converted.orbax_items import ItemReader
from nextstep_jax.checkpoint.converted.store import PARAMS_ITEM, restore_params
from nextstep_jax.sharding import make_mesh


def _whole_chunks(index: tuple[slice, ...], shape: tuple[int, ...], chunks: tuple[int, ...]) -> bool:
    """Whether a device's region starts and ends on chunk boundaries (so reading it reads no other data)."""
    for s, size, chunk in zip(index, shape, chunks):
        start, stop, _ = s.indices(size)
        if start % chunk or (stop % chunk and stop != size):
            return False
    return True


def check(path: str, mesh) -> dict:
    cfg, sharded = restore_params(path, mesh)
    report = leaf_report("nextstep", cfg, sharded, restore_params(path)[1], mesh)
    sharded = traverse_util.flatten_dict(sharded)
    item = ItemReader(f"{path}/{PARAMS_ITEM}")
    # The device regions must be unions of stored chunks.
    report["foreign_chunks"] = [
        "/".join(p) for p, array in sharded.items()
        if not all(_whole_chunks(i, array.shape, item.chunks(p))
                   for i in array.sharding.devices_indices_map(array.shape).values())]
    q = sharded[("backbone", "layers", "self_attn", "q_proj", "kernel")]
    report["q_spec"] = [a if a is None or isinstance(a, str) else list(a) for a in q.sharding.spec]
    report["q_shape"], report["q_shard_shape"] = list(q.shape), list(q.sharding.shard_shape(q.shape))
    return report


def main(path: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    print(json.dumps(check(path, make_mesh({"fsdp": 4, "tensor": 2}))))


if __name__ == "__main__":
    main(sys.argv[1])
