"""Fixtures of the model tests."""

import pytest

from nextstep_jax.models.nextstep import token_dim


@pytest.fixture(scope="module")
def golden_head(golden_model):
    """(module kwargs, variables) of the golden release's image_head, through the shared loader."""
    cfg, variables = golden_model()
    kwargs = dict(token_dim=token_dim(cfg), dim=cfg.fm_head_dim, num_layers=cfg.fm_head_layers,
                  mlp_ratio=cfg.fm_head_mlp_ratio)
    return kwargs, {"params": variables["params"]["image_head"]}
