"""Run on 8 fake CPU devices (XLA_FLAGS set by the caller): the golden model's forward, KV-cache decode
(also in the fused projection layout) and loss gradients on a (data=2, fsdp=2, tensor=2) mesh equal the
single-device results."""

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from nextstep_jax.checkpoint.load import load_nextstep
from nextstep_jax.models.backbone import init_cache
from nextstep_jax.models.fused_layout import fuse_projections
from nextstep_jax.models.nextstep import NextStep, abstract_variables, init_params
from nextstep_jax.sharding import LOGICAL_AXIS_RULES, batch_sharding, make_mesh, shardings_of


def main(golden_model_dir: str) -> None:
    assert jax.device_count() == 8, jax.devices()
    jax.config.update("jax_default_matmul_precision", "highest")
    cfg, params = load_nextstep(golden_model_dir)
    model = NextStep(cfg)
    rng = np.random.default_rng(0)
    b, t = 4, 16
    ids = rng.integers(0, cfg.boi, (b, t)).astype(np.int32)
    ids[:, 6:10] = cfg.image_placeholder_id
    tokens = rng.standard_normal((b, t, 64)).astype(np.float32)
    labels = np.where(ids == cfg.image_placeholder_id, -100, ids).astype(np.int32)

    def loss_and_grads(p, ids, labels, tokens):
        fn = lambda p: model.apply({"params": p}, ids, labels, tokens, rng=jax.random.key(0), method=NextStep.loss)[0]
        return jax.value_and_grad(fn)(p)

    def decode_with(m):
        def decode(p, ids):
            embeds = m.apply({"params": p}, ids, method=NextStep.embed)
            cache = init_cache(m.cfg, ids.shape[0], ids.shape[1])
            valid = jnp.ones(ids.shape, bool)
            h, cache = m.apply({"params": p}, embeds[:, :-1], valid.at[:, -1].set(False), cache, 0,
                               method=NextStep.step)
            h_last, _ = m.apply({"params": p}, embeds[:, -1:], valid, cache, t - 1, method=NextStep.step)
            return h_last

        return decode

    ref_hidden = jax.jit(lambda p, i: model.apply({"params": p}, i))(params, ids)
    ref_loss, ref_grads = jax.jit(loss_and_grads)(params, ids, labels, tokens)
    ref_decode = jax.jit(decode_with(model))(params, ids)

    mesh = make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    shardings = shardings_of(abstract_variables(cfg), mesh)["params"]
    batch = batch_sharding(mesh)
    with mesh, nn.logical_axis_rules(LOGICAL_AXIS_RULES):
        sharded = jax.device_put(params, shardings)
        s_ids, s_labels, s_tokens = (jax.device_put(x, batch) for x in (ids, labels, tokens))
        hidden = jax.jit(lambda p, i: model.apply({"params": p}, i))(sharded, s_ids)
        loss, grads = jax.jit(loss_and_grads, out_shardings=(None, shardings))(sharded, s_ids, s_labels, s_tokens)
        dec = jax.jit(decode_with(model))(sharded, s_ids)
        fused_cfg, fused = fuse_projections(cfg, sharded, mesh=mesh)
        fused_dec = jax.jit(decode_with(NextStep(fused_cfg)))(fused, s_ids)

    fresh = init_params(cfg, jax.random.key(7))
    fresh_sharded = init_params(cfg, jax.random.key(7), mesh)
    init_err = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(fresh_sharded)))
    fresh_q = fresh_sharded["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"]
    q = sharded["backbone"]["layers"]["self_attn"]["q_proj"]["kernel"]
    qkv = fused["backbone"]["layers"]["self_attn"]["qkv_proj"]["kernel"]
    report = {
        "hidden_err": float(jnp.max(jnp.abs(hidden - ref_hidden))),
        "decode_err": float(jnp.max(jnp.abs(dec - ref_decode))),
        "fused_decode_err": float(jnp.max(jnp.abs(fused_dec - ref_decode))),
        "qkv_spec": [list(a) if isinstance(a, tuple) else a for a in qkv.sharding.spec],
        "qkv_shard_shape": list(qkv.addressable_shards[0].data.shape),
        "qkv_shape": list(qkv.shape),
        "loss": [float(loss), float(ref_loss)],
        "grad_err": max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads))),
        "grad_scale": max(float(jnp.max(jnp.abs(b))) for b in jax.tree.leaves(ref_grads)),
        "q_spec": [list(a) if isinstance(a, tuple) else a for a in q.sharding.spec],
        "q_shard_shape": list(q.addressable_shards[0].data.shape),
        "q_shape": list(q.shape),
        "init_err": init_err,
        "init_q_shard_shape": list(fresh_q.addressable_shards[0].data.shape),
        "batch_spec": [list(a) if isinstance(a, tuple) else a for a in s_ids.sharding.spec],
    }
    print(json.dumps(report))


if __name__ == "__main__":
    main(sys.argv[1])
