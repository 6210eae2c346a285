"""Run by test_checkpointing.py with 8 fake CPU devices: save a state sharded (fsdp=8), restore it into a
(data=2, tensor=4) sharding and into one device; every value equal, each device holding only its shard."""

import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nextstep_jax.sharding import make_mesh
from nextstep_jax.training.checkpointing import TrainCheckpointer, abstract_like


def main(directory: str) -> None:
    assert jax.device_count() == 8
    saved_mesh = make_mesh({"fsdp": 8})
    values = {"w": np.arange(16 * 24, dtype=np.float32).reshape(16, 24), "b": np.arange(8, dtype=np.float32)}
    state = {"params": {"w": jax.device_put(values["w"], NamedSharding(saved_mesh, P("fsdp", None))),
                        "b": jax.device_put(values["b"], NamedSharding(saved_mesh, P("fsdp")))},
             "step": jnp.int32(5)}
    ckpt = TrainCheckpointer(directory, every_steps=5, keep=1)
    ckpt.save(5, state)
    ckpt.close()

    mesh = make_mesh({"data": 2, "tensor": 4})
    target = abstract_like(state)
    target["params"]["w"] = jax.ShapeDtypeStruct((16, 24), jnp.float32,
                                                 sharding=NamedSharding(mesh, P("data", "tensor")))
    target["params"]["b"] = jax.ShapeDtypeStruct((8,), jnp.float32, sharding=NamedSharding(mesh, P("tensor")))
    step, restored = TrainCheckpointer(directory, every_steps=5, keep=1).restore_latest(target)
    assert step == 5 and int(restored["step"]) == 5
    w = restored["params"]["w"]
    assert w.sharding == target["params"]["w"].sharding
    assert {s.data.shape for s in w.addressable_shards} == {(8, 6)}
    for shard in w.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), values["w"][shard.index])
    np.testing.assert_array_equal(np.asarray(restored["params"]["b"]), values["b"])

    single = jax.sharding.SingleDeviceSharding(jax.devices()[3])
    target = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=single), state)
    _, restored = TrainCheckpointer(directory, every_steps=5, keep=1).restore_latest(target)
    assert restored["params"]["w"].devices() == {jax.devices()[3]}
    np.testing.assert_array_equal(np.asarray(restored["params"]["w"]), values["w"])
    print("ok")


if __name__ == "__main__":
    main(sys.argv[1])
