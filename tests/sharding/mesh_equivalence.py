"""Run on 8 fake CPU devices (XLA_FLAGS set by the caller; prints one JSON report).

For the golden model on several (data, fsdp, tensor) meshes, including tensor > KV heads: the loss, the
gradients, one full train step (AdamW update) and a KV-cache decode (also fused) against one device. A model
with one KV head and an odd vocabulary on tensor=2 (replicated by the indivisible-dimension policy). The
lowered forward and train step carry sharding constraints. Per-device temporaries of a batch-dominated
forward as the batch axes grow.
"""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from nextstep_jax.checkpoint import load_model
from nextstep_jax.configs import replace
from nextstep_jax.models.backbone import init_cache
from nextstep_jax.models.layouts import fuse_projections
from nextstep_jax.models.nextstep import NextStep, abstract_variables, init_params, token_dim
from nextstep_jax.sharding import batch_sharding, make_mesh, shardings_of, use_mesh
from nextstep_jax.training.state import init_train_state
from nextstep_jax.training.step import make_train_step

def meshes(cfg) -> list[dict[str, int]]:
    """(data, fsdp, tensor) shapes on up to 8 devices for the golden model's sizes, one with more tensor shards
    than KV heads (the smallest that divides the query heads; it may leave devices unused)."""
    tensor = next((t for t in range(cfg.num_kv_heads + 1, 9) if cfg.num_heads % t == 0), None)
    assert tensor, f"no tensor size in ({cfg.num_kv_heads}, 8] divides {cfg.num_heads} heads"
    return [{"data": 8, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 2, "tensor": 2},
            {"data": 1, "fsdp": 8 // tensor, "tensor": tensor}]


def _mesh(shape):
    return make_mesh(shape, devices=jax.devices()[:int(np.prod(list(shape.values())))])


def _batch(cfg, rows, length, seed):
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, cfg.boi, (rows, length)).astype(np.int32)
    ids[:, length // 3: length // 3 + 4] = cfg.image_placeholder_id
    labels = np.where(ids == cfg.image_placeholder_id, -100, ids).astype(np.int32)
    half = length // 2
    segments = np.concatenate([np.ones((rows, half)), np.full((rows, length - half), 2)], 1).astype(np.int32)
    positions = np.concatenate([np.arange(half), np.arange(length - half)])[None].repeat(rows, 0).astype(np.int32)
    return {"input_ids": ids, "labels": labels, "segment_ids": segments, "positions": positions,
            "image_loss_mask": (ids == cfg.image_placeholder_id).astype(np.int32),
            "image_tokens": rng.standard_normal((rows, length, token_dim(cfg))).astype(np.float32)}


IMAGE_SLOTS = 6


def text_slots(cfg, batch) -> int:
    """The most text targets a row of ``batch`` holds (the LM head's gathered slots, none to spare)."""
    ids, seg = batch["input_ids"], batch["segment_ids"]
    text = ((np.roll(ids, -1, 1) != cfg.image_placeholder_id) & (np.roll(batch["labels"], -1, 1) != -100)
            & (np.roll(seg, -1, 1) == seg))
    return int(text[:, :-1].sum(1).max())


def _full_config(cfg, mesh_shape, microbatches, text_positions):
    import ml_collections

    return ml_collections.ConfigDict({"model": cfg.to_dict(), "mesh": mesh_shape, "train_step": {
        "microbatches": microbatches, "text_positions": text_positions}})


def _rel_errors(got, ref):
    """Per tensor: max|got - ref| / max|ref| (the worst one is reported)."""
    worst = 0.0
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref)):
        a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
        scale = max(float(np.max(np.abs(b))), 1e-30)
        worst = max(worst, float(np.max(np.abs(a - b))) / scale)
    return worst


def _run(cfg, params, batch, mesh, microbatches=1):
    """(loss, grads, metrics and params after one AdamW step, decode hidden) on ``mesh``."""
    model = NextStep(cfg)
    # Adam's first update is ~lr·sign(g): with a tiny eps, gradient entries at rounding-noise level would flip
    # between meshes by a whole step. eps well above that noise keeps the update a smooth function of g.
    optimizer = optax.adamw(1e-2, b1=0.9, b2=0.95, eps=1e-3, weight_decay=0.1)
    with use_mesh(mesh):
        shardings = shardings_of(abstract_variables(cfg), mesh)["params"]
        sharded = jax.device_put(params, shardings)
        sbatch = jax.device_put(batch, batch_sharding(mesh))

        def loss_fn(p, b):
            return model.apply({"params": p}, b["input_ids"], b["labels"], b["image_tokens"], b["image_loss_mask"],
                               segment_ids=b["segment_ids"], positions=b["positions"], rng=jax.random.key(0),
                               method=NextStep.loss)[0]

        loss, grads = jax.jit(jax.value_and_grad(loss_fn), out_shardings=(None, shardings))(sharded, sbatch)
        lowered_forward = jax.jit(lambda p, i: model.apply({"params": p}, i)).lower(sharded, sbatch["input_ids"])
    # The step's FM head on each row's image targets gathered into IMAGE_SLOTS slots (4 targets, 2 empty), its
    # LM head on the text targets gathered into text_slots.
    step = make_train_step(_full_config(cfg, dict(mesh.shape), microbatches, text_slots(cfg, batch)),
                           model, optimizer, mesh, image_positions=IMAGE_SLOTS)
    state = init_train_state(cfg, optimizer, mesh, params=sharded)
    lowered_step = step.lower(state, sbatch)
    state, metrics = step(state, sbatch)
    return {"loss": loss, "grads": grads, "metrics": metrics, "params": state.params,
            "forward_constraints": lowered_forward.as_text().count("sharding_constraint"),
            "step_constraints": lowered_step.as_text().count("sharding_constraint")}


def _decode(model, params, ids):
    embeds = model.apply({"params": params}, ids, method=NextStep.embed)
    t = ids.shape[1]
    cache = init_cache(model.cfg, ids.shape[0], t)
    valid = jnp.ones(ids.shape, bool)
    _, cache = model.apply({"params": params}, embeds[:, :-1], valid.at[:, -1].set(False), cache, 0,
                           method=NextStep.step)
    h_last, _ = model.apply({"params": params}, embeds[:, -1:], valid, cache, t - 1, method=NextStep.step)
    return h_last


def _spec(x):
    return [list(a) if isinstance(a, tuple) else a for a in x.sharding.spec]


def temporaries(cfg, params, mesh_shapes, rows, length):
    """Compiled per-device temporary bytes of a forward at a batch much larger than the model."""
    out = []
    ids = jax.ShapeDtypeStruct((rows, length), jnp.int32)
    model = NextStep(cfg)
    for shape in mesh_shapes:
        mesh = _mesh(shape)
        with use_mesh(mesh):
            shardings = shardings_of(abstract_variables(cfg), mesh)["params"]
            p = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
            i = jax.ShapeDtypeStruct(ids.shape, ids.dtype, sharding=batch_sharding(mesh))
            compiled = jax.jit(lambda p, i: model.apply({"params": p}, i)).lower(p, i).compile()
        out.append(int(compiled.memory_analysis().temp_size_in_bytes))
    return out


def main(golden_model_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg, params = load_model(golden_model_dir)
    batch = _batch(cfg, 8, 16, 0)
    one = make_mesh({"fsdp": 1}, devices=jax.devices()[:1])
    ref = _run(cfg, params, batch, one)
    report = {"meshes": [], "kv_heads": cfg.num_kv_heads}
    for shape in meshes(cfg):
        r = _run(cfg, params, batch, _mesh(shape))
        metrics = ("loss", "lm_loss", "im_loss", "grad_norm", "lm_gathered")
        report["meshes"].append({
            "mesh": shape, "loss": [float(r["loss"]), float(ref["loss"])],
            "grad_err": _rel_errors(r["grads"], ref["grads"]),
            "step_metrics_err": _rel_errors({k: r["metrics"][k] for k in metrics},
                                            {k: ref["metrics"][k] for k in metrics}),
            "updated_params_err": _rel_errors(r["params"], ref["params"]),
            "lm_gathered": float(r["metrics"]["lm_gathered"]), "update_size": _rel_errors(r["params"], params),
            "forward_constraints": r["forward_constraints"], "step_constraints": r["step_constraints"]})
    # Both heads in chunks of 4 positions (32 rows each) on (2, 2, 2): the shapes at which XLA's SPMD pass
    # once miscompiled the FM head's mlp_2 (see fm_head.ResBlock.modulated).
    chunked = replace(cfg, loss_chunk_size=4)
    chunked_ref = _run(chunked, params, batch, one)
    r = _run(chunked, params, batch, _mesh(meshes(cfg)[1]))
    report["chunked"] = {"loss": [float(r["loss"]), float(chunked_ref["loss"])],
                         "grad_err": _rel_errors(r["grads"], chunked_ref["grads"]),
                         "updated_params_err": _rel_errors(r["params"], chunked_ref["params"])}
    # Gradient accumulation: two microbatches give the one-batch step.
    r = _run(cfg, params, batch, _mesh(meshes(cfg)[1]), microbatches=2)
    report["microbatches"] = {"updated_params_err": _rel_errors(r["params"], ref["params"]),
                              "loss": [float(r["metrics"]["loss"]), float(ref["metrics"]["loss"])]}

    # Decode (also in the fused layout) and placement on (2, 2, 2).
    mesh = _mesh(meshes(cfg)[1])
    model = NextStep(cfg)
    ids = jnp.asarray(batch["input_ids"][:4])
    ref_decode = jax.jit(lambda p, i: _decode(model, p, i))(params, ids)
    with use_mesh(mesh):
        shardings = shardings_of(abstract_variables(cfg), mesh)["params"]
        sharded = jax.device_put(params, shardings)
        s_ids = jax.device_put(ids, batch_sharding(mesh))
        dec = jax.jit(lambda p, i: _decode(model, p, i))(sharded, s_ids)
        fused_cfg, fused = fuse_projections(cfg, sharded, mesh=mesh)
        fused_dec = jax.jit(lambda p, i: _decode(NextStep(fused_cfg), p, i))(fused, s_ids)
    fresh = init_params(cfg, jax.random.key(7))
    fresh_sharded = init_params(cfg, jax.random.key(7), mesh)
    q = sharded["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"]
    qkv = fused["backbone"]["layers"]["self_attn"]["qkv_proj"]["kernel"]
    report.update({
        "decode_err": _rel_errors(dec, ref_decode),
        "fused_decode_err": _rel_errors(fused_dec, ref_decode),
        "q_spec": _spec(q), "q_shape": list(q.shape), "q_shard_shape": list(q.addressable_shards[0].data.shape),
        "qkv_spec": _spec(qkv), "qkv_shape": list(qkv.shape),
        "qkv_shard_shape": list(qkv.addressable_shards[0].data.shape),
        "init_err": _rel_errors(fresh_sharded, fresh),
        "init_q_shard_shape": list(fresh_sharded["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"]
                                   .addressable_shards[0].data.shape),
        "batch_spec": _spec(s_ids),
    })

    # One KV head and an odd vocabulary on tensor=2: both dimensions replicated, same results.
    odd = replace(cfg, num_kv_heads=1, vocab_size=cfg.vocab_size - 1 + cfg.vocab_size % 2)
    odd_params = init_params(odd, jax.random.key(3))
    odd_batch = _batch(odd, 4, 12, 1)
    odd_ref = _run(odd, odd_params, odd_batch, one)
    odd_mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    r = _run(odd, odd_params, odd_batch, odd_mesh)
    odd_sharded = init_params(odd, jax.random.key(3), odd_mesh)
    report["odd"] = {
        "vocab_size": odd.vocab_size, "loss": [float(r["loss"]), float(odd_ref["loss"])],
        "grad_err": _rel_errors(r["grads"], odd_ref["grads"]),
        "updated_params_err": _rel_errors(r["params"], odd_ref["params"]),
        "k_spec": _spec(odd_sharded["backbone"]["layers"]["self_attn"]["k_proj"]["kernel"]),
        "embed_spec": _spec(odd_sharded["embed_tokens"]["embedding"]),
    }

    # Batch-dominated forward: per-device temporaries as the batch is split 1, 2, 4, 8 ways.
    report["temporaries"] = temporaries(cfg, params, [{"data": 1, "fsdp": 1}, {"data": 2, "fsdp": 1},
                                                      {"data": 2, "fsdp": 2}, {"data": 2, "fsdp": 4}], 16, 256)
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
