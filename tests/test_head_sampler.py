"""Sampling with precomputed modulations is the same function as evaluating the whole head at every step."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from nextstep_jax.models.fm_head import head_module, sample_head


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grid,method", [("nextstep1", "sde"), ("nextstep1", "ode"), ("nextstep1.1", "sde")])
def test_precomputed_modulations_match_plain_sampling(golden_model, dtype, grid, method):
    cfg, variables = golden_model(scan_layers=False)
    head = variables["params"]["image_head"]
    module = head_module(head, dtype)
    assert (module.dim, module.num_layers, module.mlp_ratio) == (cfg.fm_head_dim, cfg.fm_head_layers,
                                                                 cfg.fm_head_mlp_ratio)
    c = jax.random.normal(jax.random.key(0), (6, cfg.hidden_size)).astype(dtype)
    kw = dict(cfg_mult=3, cfg=3.0, cfg_img=1.5, num_steps=6, timesteps_shift=3.2, grid=grid, method=method,
              key=jax.random.key(1))
    expected = sample_head(module, {"params": head}, c, precompute_modulations=False, **kw)
    got = sample_head(module, {"params": head}, c, **kw)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(expected))
