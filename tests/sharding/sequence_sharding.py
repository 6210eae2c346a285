"""Run on 8 fake CPU devices (XLA_FLAGS set by the caller; prints one JSON report).

The ``sequence`` mesh axis: the golden model's loss, gradients and one train step on meshes that split the
sequence (alone and with fsdp) against one device, also through the splash kernel (which gathers the sequence
for itself under shard_map); and the per-device temporaries of a long-sequence forward as the sequence is split
1, 2, 4 and 8 ways (activations really are split, not replicated).
"""

import json
import sys

import jax

from mesh_equivalence import _batch, _mesh, _rel_errors, _run, temporaries
from nextstep_jax.checkpoint import load_model
from nextstep_jax.configs import replace
from nextstep_jax.sharding import make_mesh

MESHES = ({"sequence": 8}, {"fsdp": 2, "sequence": 4})


def main(golden_model_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg, params = load_model(golden_model_dir)
    cfg = replace(cfg, attention_impl="xla")
    batch = _batch(cfg, 4, 32, 0)
    ref = _run(cfg, params, batch, make_mesh({"fsdp": 1}, devices=jax.devices()[:1]))
    report = {"meshes": []}
    for shape in MESHES:
        r = _run(cfg, params, batch, _mesh(shape))
        report["meshes"].append({"mesh": shape, "loss": [float(r["loss"]), float(ref["loss"])],
                                 "grad_err": _rel_errors(r["grads"], ref["grads"]),
                                 "updated_params_err": _rel_errors(r["params"], ref["params"]),
                                 "update_size": _rel_errors(r["params"], params)})
    splash = replace(cfg, attention_impl="splash", attention_block_q=128, attention_block_kv=128)
    r = _run(splash, params, batch, _mesh(MESHES[1]))
    report["splash"] = {"mesh": MESHES[1], "loss": [float(r["loss"]), float(ref["loss"])],
                        "grad_err": _rel_errors(r["grads"], ref["grads"])}
    report["temporaries"] = temporaries(cfg, params, [{"sequence": n} for n in (1, 2, 4, 8)], 1, 2048)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
