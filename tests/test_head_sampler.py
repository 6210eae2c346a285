"""The precomputed-modulation head sampler is the same function as fm_head.sample_head."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from nextstep_jax.head_sampler import sample_tokens
from nextstep_jax.models.fm_head import SimpleMLPAdaLN, sample_head


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("grid,method", [("nextstep1", "sde"), ("nextstep1", "ode"), ("nextstep1.1", "sde")])
def test_matches_sample_head(golden_model, dtype, grid, method):
    cfg, variables = golden_model(scan_layers=False)
    head = variables["params"]["image_head"]
    module = SimpleMLPAdaLN(token_dim=head["final_layer"]["linear"]["kernel"].shape[-1], dim=cfg.fm_head_dim,
                            num_layers=cfg.fm_head_layers, mlp_ratio=cfg.fm_head_mlp_ratio, dtype=dtype)
    c = jax.random.normal(jax.random.key(0), (6, cfg.hidden_size)).astype(dtype)
    kw = dict(cfg_mult=3, cfg=3.0, cfg_img=1.5, num_steps=6, timesteps_shift=3.2, grid=grid, method=method,
              key=jax.random.key(1))
    expected = sample_head(module, {"params": head}, c, **kw)
    np.testing.assert_array_equal(np.asarray(sample_tokens(head, c, dtype=dtype, **kw)), np.asarray(expected))
