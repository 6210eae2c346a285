"""Parameter layouts: scanned <-> unrolled and separate <-> fused are exact round trips onto the trees the
models of the target layouts initialise; layers and fused blocks sit where the docstring says; the release
table refuses fused params; for_decoding gives the decode layout."""

import jax
import numpy as np
import pytest
from flax import linen as nn

from nextstep_jax.checkpoint.mapping import nextstep_table
from nextstep_jax.configs import model_config
from nextstep_jax.models.layouts import (
    for_decoding,
    fuse_projections,
    scan_to_unrolled,
    unfuse_projections,
    unrolled_to_scan,
)
from nextstep_jax.models.nextstep import abstract_variables, init_variables


def _cfg(scan_layers: bool):
    # mlp_bias on so that biases of both fused kernels are covered; 6 query heads over 2 kv heads (G = 3).
    return model_config(vocab_size=64, hidden_size=48, intermediate_size=40, num_layers=2, num_heads=6,
                        num_kv_heads=2, head_dim=8, mlp_bias=True, fm_head_dim=16, fm_head_layers=1,
                        scan_layers=scan_layers)


def _random_params(cfg):
    params = nn.unbox(init_variables(cfg, jax.random.key(0)))["params"]
    leaves, treedef = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    return jax.tree.unflatten(treedef, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])


def _shapes(tree):
    return jax.tree.map(lambda x: tuple(x.shape), tree)


def _assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("scan_layers", [True, False])
def test_round_trip_is_exact_and_matches_the_fused_model(scan_layers):
    cfg = _cfg(scan_layers)
    params = _random_params(cfg)
    fused_cfg, fused = fuse_projections(cfg, params)
    assert fused_cfg.fused_qkv and fused_cfg.fused_mlp and not cfg.fused_qkv
    assert _shapes(fused) == _shapes(nn.unbox(abstract_variables(fused_cfg))["params"])
    back_cfg, back = unfuse_projections(fused_cfg, fused)
    assert not back_cfg.fused_qkv and not back_cfg.fused_mlp
    _assert_same(back, params)


def test_fused_blocks_follow_the_gqa_grouping():
    cfg = _cfg(False)
    params = _random_params(cfg)
    _, fused = fuse_projections(cfg, params)
    attn, fattn = params["backbone"]["layers_1"]["self_attn"], fused["backbone"]["layers_1"]["self_attn"]
    qkv = np.asarray(fattn["qkv_proj"]["kernel"])  # [E, KV, G+2, D]
    q = np.asarray(attn["q_proj"]["kernel"])  # [E, H, D]
    for j in range(2):
        for g in range(3):
            np.testing.assert_array_equal(qkv[:, j, g], q[:, 3 * j + g])  # query head j·G+g
        np.testing.assert_array_equal(qkv[:, j, 3], np.asarray(attn["k_proj"]["kernel"])[:, j])
        np.testing.assert_array_equal(qkv[:, j, 4], np.asarray(attn["v_proj"]["kernel"])[:, j])
    np.testing.assert_array_equal(np.asarray(fattn["qkv_proj"]["bias"])[1, 4], np.asarray(attn["v_proj"]["bias"])[1])
    mlp, fmlp = params["backbone"]["layers_1"]["mlp"], fused["backbone"]["layers_1"]["mlp"]
    np.testing.assert_array_equal(np.asarray(fmlp["gate_up_proj"]["kernel"])[:, 0], np.asarray(mlp["gate_proj"]["kernel"]))
    np.testing.assert_array_equal(np.asarray(fmlp["gate_up_proj"]["bias"])[1], np.asarray(mlp["up_proj"]["bias"]))


def test_release_table_refuses_the_fused_layout():
    cfg = _cfg(True)
    cfg.fused_qkv = True
    with pytest.raises(ValueError, match="unfuse_projections"):
        nextstep_table(cfg)


def test_scan_and_unroll_are_exact_inverses_onto_the_models_trees():
    cfg = _cfg(True)
    params = _random_params(cfg)
    unrolled_cfg, unrolled = scan_to_unrolled(cfg, params)
    assert not unrolled_cfg.scan_layers and cfg.scan_layers
    assert _shapes(unrolled) == _shapes(nn.unbox(abstract_variables(unrolled_cfg))["params"])
    stacked = params["backbone"]["layers"]
    for i in range(cfg.num_layers):  # layer i is slice i of every stacked leaf
        _assert_same(unrolled["backbone"][f"layers_{i}"], jax.tree.map(lambda x: np.asarray(x)[i], stacked))
    outside = lambda tree: {k: v for k, v in tree.items() if k != "backbone"}  # noqa: E731
    _assert_same(outside(unrolled), outside(params))
    np.testing.assert_array_equal(unrolled["backbone"]["norm"]["scale"], params["backbone"]["norm"]["scale"])
    scanned_cfg, scanned = unrolled_to_scan(unrolled_cfg, unrolled)
    assert scanned_cfg.scan_layers
    _assert_same(scanned, params)
    assert "layers" in params["backbone"]  # the input tree is left as it was
    assert scan_to_unrolled(unrolled_cfg, unrolled)[1] is unrolled  # already in the layout: unchanged


def test_donated_inputs_are_freed():
    cfg = _cfg(True)
    params = jax.device_put(_random_params(cfg))
    want = jax.tree.map(np.asarray, params)
    _, unrolled = scan_to_unrolled(cfg, params, donate=True)
    assert all(x.is_deleted() for x in jax.tree.leaves(params["backbone"]["layers"]))
    _assert_same(unrolled_to_scan(_cfg(False), unrolled)[1], want)


@pytest.mark.parametrize("scan_layers", [True, False])
def test_for_decoding_is_unrolled_and_fused(scan_layers):
    cfg = _cfg(scan_layers)
    params = _random_params(cfg)
    dec_cfg, dec = for_decoding(cfg, params)
    assert not dec_cfg.scan_layers and dec_cfg.fused_qkv and dec_cfg.fused_mlp
    assert _shapes(dec) == _shapes(nn.unbox(abstract_variables(dec_cfg))["params"])
    _assert_same(unfuse_projections(dec_cfg, dec)[1], scan_to_unrolled(cfg, params)[1])
