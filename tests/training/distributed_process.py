"""One of two real JAX processes started by test_distributed.py (settings from the NEXTSTEP_* environment,
4 fake CPU devices each): print the global device count and a cross-process reduction as JSON."""

import json

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from nextstep_jax.training.distributed import initialize


def main() -> None:
    settings = initialize()
    mesh = jax.make_mesh((jax.device_count(),), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    sharding = NamedSharding(mesh, P("data"))
    # Row r of the global [8, 3] array holds r + 1 and lives on device r; each process builds only its rows.
    rows = {d: np.full((1, 3), float(i + 1), np.float32) for i, d in enumerate(mesh.devices.flat)}
    local = [jax.device_put(rows[d], d) for d in jax.local_devices()]
    x = jax.make_array_from_single_device_arrays((jax.device_count(), 3), sharding, local)
    total = jax.jit(lambda a: jnp.sum(a * a), out_shardings=NamedSharding(mesh, P()))(x)
    print(json.dumps({"mode": settings.mode, "process": jax.process_index(), "processes": jax.process_count(),
                      "devices": jax.device_count(), "local_devices": jax.local_device_count(),
                      "sum_of_squares": float(total)}))
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
