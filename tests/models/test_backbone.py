"""Backbone invariants on a random tiny model: scanned == unrolled, packed documents == separate
documents, KV-cache decode == full forward (with left padding), remat changes nothing."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from nextstep_jax.checkpoint.mapping import nextstep_table, params_from_tensors, tensors_from_params
from nextstep_jax.models.backbone import init_cache
from nextstep_jax.models.nextstep import NextStep, init_variables, token_dim
from numerics import assert_close_rel


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def tiny(tiny_config):
    cfg = tiny_config.model
    params = nn.unbox(init_variables(cfg, jax.random.key(0)))["params"]
    # Non-zero head and projector weights (the official init zeroes parts of the FM head).
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    return cfg, {"params": params}


def _relayout(cfg, params, scan_layers):
    """Same weights in the other layer layout, through the mapping table."""
    src = nextstep_table(cfg)
    dst_cfg = cfg.copy_and_resolve_references()
    dst_cfg.scan_layers = scan_layers
    tensors = dict(tensors_from_params(src, params))
    return dst_cfg, params_from_tensors(nextstep_table(dst_cfg), tensors.__getitem__)


def _ids(cfg, rng, shape):
    return jnp.asarray(rng.integers(0, cfg.boi, shape), jnp.int32)


def test_scanned_equals_unrolled(tiny):
    cfg, variables = tiny
    ids = _ids(cfg, np.random.default_rng(0), (2, 11))
    scanned = NextStep(cfg).apply(variables, ids)
    ucfg, uparams = _relayout(cfg, variables["params"], scan_layers=False)
    unrolled = NextStep(ucfg).apply({"params": uparams}, ids)
    assert_close_rel(unrolled, scanned, 1e-6, "unrolled vs scanned")


def test_packed_documents_equal_separate_documents(tiny):
    cfg, variables = tiny
    model = NextStep(cfg)
    rng = np.random.default_rng(1)
    lengths = [5, 7, 3]
    docs = [_ids(cfg, rng, (1, n)) for n in lengths]
    pad = 2
    packed = jnp.concatenate(docs + [jnp.full((1, pad), cfg.pad_token_id, jnp.int32)], axis=1)
    segments = jnp.asarray(np.concatenate([np.full(n, i + 1) for i, n in enumerate(lengths)] + [np.zeros(pad)])[None],
                           jnp.int32)
    positions = jnp.asarray(np.concatenate([np.arange(n) for n in lengths] + [np.zeros(pad)])[None], jnp.int32)
    hidden = model.apply(variables, packed, segment_ids=segments, positions=positions)
    start = 0
    for doc, n in zip(docs, lengths):
        alone = model.apply(variables, doc)
        assert_close_rel(hidden[:, start:start + n], alone, 1e-5, f"document at {start}")
        start += n


@pytest.mark.parametrize("scan_layers", [True, False])
def test_kv_cache_decode_equals_full_forward(tiny, scan_layers):
    cfg, variables = tiny
    if not scan_layers:
        cfg, params = _relayout(cfg, variables["params"], scan_layers=False)
        variables = {"params": params}
    model = NextStep(cfg)
    rng = np.random.default_rng(2)
    b, t, prefill, cache_len = 2, 12, 8, 15
    ids = _ids(cfg, rng, (b, t))
    mask = np.ones((b, t), bool)
    mask[1, :3] = False  # left padding
    full = np.asarray(model.apply(variables, ids, attention_mask_2d=jnp.asarray(mask)))
    embeds = model.apply(variables, ids, method=NextStep.embed)
    cache = init_cache(cfg, b, cache_len)
    kv_valid = np.zeros((b, cache_len), bool)
    kv_valid[:, :prefill] = mask[:, :prefill]
    step = jax.jit(lambda v, e, kv, c, i: model.apply(v, e, kv, c, i, method=NextStep.step))
    h, cache = step(variables, embeds[:, :prefill], jnp.asarray(kv_valid), cache, 0)
    assert_close_rel(np.asarray(h)[mask[:, :prefill]], full[:, :prefill][mask[:, :prefill]], 1e-5, "prefill")
    for i in range(prefill, t):
        kv_valid[:, i] = True
        h, cache = step(variables, embeds[:, i:i + 1], jnp.asarray(kv_valid), cache, i)
        assert_close_rel(h[:, 0], full[:, i], 1e-5, f"decode step {i}")


@pytest.mark.parametrize("policy", ["full", "dots", "save_qkv_attention", "offload_qkv_attention",
                                    "offload_dots_with_no_batch_dims"])
def test_remat_keeps_loss_and_gradients(tiny, policy):
    cfg, variables = tiny
    rng = np.random.default_rng(3)
    ids = np.array(_ids(cfg, rng, (2, 10)))
    ids[:, 4:8] = cfg.image_placeholder_id
    tokens = jnp.asarray(rng.standard_normal((2, 10, token_dim(cfg))), jnp.float32)
    labels = jnp.asarray(np.where(ids == cfg.image_placeholder_id, -100, ids))

    def grads(c):
        fn = lambda v: NextStep(c).apply(v, jnp.asarray(ids), labels, tokens, rng=jax.random.key(0),
                                         method=NextStep.loss)[0]
        return jax.jit(jax.value_and_grad(fn))(variables)

    base_loss, base_grads = grads(cfg)
    rcfg = cfg.copy_and_resolve_references()
    rcfg.remat_policy = policy
    loss, g = grads(rcfg)
    assert float(loss) == pytest.approx(float(base_loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(base_grads)):
        assert_close_rel(a, b, 1e-5, "remat grads")
