"""The analytic step FLOPs against a closed form written out from the config's sizes."""

import pytest

from conftest import repo_config
from nextstep_jax.configs import replace
from nextstep_jax.training.flops import train_step_flops


def _closed_form(m, batch, seq):
    e, h, kv, d, i, v, layers = (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size,
                                 m.vocab_size, m.num_layers)
    tok = m.latent_channels * m.latent_patch_size ** 2
    dim, mlp = m.fm_head_dim, int(m.fm_head_dim * m.fm_head_mlp_ratio)
    layer = e * h * d + 2 * e * kv * d + h * d * e + 3 * e * i
    head_copy = (256 * dim + dim * dim + tok * dim + m.fm_head_layers * (3 * dim * dim + 2 * dim * mlp)
                 + 2 * dim * dim + dim * tok)
    layers_fwd = 2 * layers * layer + layers * 4 * seq * h * d
    heads_fwd = 2 * e * v + 2 * (e * e + e * dim) + 2 * m.fm_head_batch_mul * head_copy
    forward = layers_fwd + heads_fwd + 2 * tok * e
    tokens = batch * seq
    return 3 * forward * tokens, (3 * forward + layers_fwd + heads_fwd) * tokens


@pytest.mark.parametrize("name", ["tiny", "14b"])
def test_train_step_flops_closed_form(name):
    model = repo_config(name).model
    model = replace(model, remat_policy="full")
    model_flops, hardware = _closed_form(model, 4, 512)
    got = train_step_flops(model, 4, 512)
    assert got["model"] == pytest.approx(model_flops, rel=1e-12)
    assert got["hardware"] == pytest.approx(hardware, rel=1e-12)
    assert got["tokens"] == 4 * 512
    # Without remat only the chunked loss heads are recomputed.
    plain = train_step_flops(replace(model, remat_policy="none"), 4, 512)
    assert plain["model"] == got["model"] < plain["hardware"] < got["hardware"]


def test_14b_is_about_6n_plus_attention():
    model = repo_config("14b").model
    got = train_step_flops(model, 1, 8192)
    # 14.95B parameters, of which the 0.78B embedding table does no matmul; the FM head runs 4x per position.
    per_token = got["model"] / got["tokens"]
    assert 6 * 14.0e9 < per_token - 3 * 4 * 8192 * 40 * 128 * 48 < 6 * 15.5e9
