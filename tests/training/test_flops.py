"""The analytic step FLOPs against a closed form written out from the config's sizes."""

import pytest

from conftest import repo_config
from nextstep_jax.configs import replace
from nextstep_jax.training.flops import train_step_flops


def _closed_form(m, batch, seq, targets, slots, lm_positions=None, images=True, text_slots=None):
    """(model, hardware) FLOPs: ``targets`` image targets per row, the FM head on ``slots`` per row, the LM
    head's useful work on ``lm_positions`` (default: the positions that are not image targets) and its run on
    ``text_slots`` (default: every position)."""
    e, h, kv, d, i, v, layers = (m.hidden_size, m.num_heads, m.num_kv_heads, m.head_dim, m.intermediate_size,
                                 m.vocab_size, m.num_layers)
    tok = m.latent_channels * m.latent_patch_size ** 2
    dim, mlp = m.fm_head_dim, int(m.fm_head_dim * m.fm_head_mlp_ratio)
    layer = e * h * d + 2 * e * kv * d + h * d * e + 3 * e * i
    head_copy = (256 * dim + dim * dim + tok * dim + m.fm_head_layers * (3 * dim * dim + 2 * dim * mlp)
                 + 2 * dim * dim + dim * tok)
    matmuls, dense_attention = 2 * layers * layer, layers * 4 * seq * h * d
    lm, image = 2 * e * v, 2 * (e * e + e * dim) + 2 * m.fm_head_batch_mul * head_copy
    image_in = 2 * tok * e
    lm_positions = seq - targets if lm_positions is None else lm_positions
    text_slots = seq if text_slots is None else text_slots
    useful = ((matmuls + dense_attention / 2) * seq + lm * lm_positions + (image + image_in) * targets)
    run = (matmuls + dense_attention) * seq + lm * text_slots + image * slots + image_in * seq * images
    recompute = (matmuls + dense_attention) * seq if m.remat_policy != "none" else 0
    recompute += lm * text_slots * (text_slots > m.loss_chunk_size) + image * slots * (slots > m.loss_chunk_size)
    return 3 * useful * batch, (3 * run + recompute) * batch


@pytest.mark.parametrize("name", ["tiny", "14b"])
@pytest.mark.parametrize("remat", ["full", "none"])
def test_train_step_flops_closed_form(name, remat):
    model = replace(repo_config(name).model, remat_policy=remat, loss_chunk_size=256)
    for targets, slots in ((100, 128), (300, 320)):  # the FM head in one chunk, then in two
        model_flops, hardware = _closed_form(model, 4, 512, targets, slots)
        got = train_step_flops(model, 4, 512, image_targets=targets, image_positions=slots)
        assert got["model"] == pytest.approx(model_flops, rel=1e-12)
        assert got["hardware"] == pytest.approx(hardware, rel=1e-12)
        assert got["tokens"] == 4 * 512
    for text_slots in (200, 412):  # the LM head on gathered text targets, in one chunk, then in two
        _, hardware = _closed_form(model, 4, 512, 100, 128, text_slots=text_slots)
        got = train_step_flops(model, 4, 512, image_targets=100, image_positions=128, text_positions=text_slots)
        assert got["hardware"] == pytest.approx(hardware, rel=1e-12)


def test_without_bounds_every_position_counts_for_both_heads():
    model = replace(repo_config("tiny").model, remat_policy="none", loss_chunk_size=1024)
    got = train_step_flops(model, 2, 512)
    model_flops, hardware = _closed_form(model, 2, 512, 512, 512, lm_positions=512)
    assert got["model"] == pytest.approx(model_flops, rel=1e-12)
    assert got["hardware"] == pytest.approx(hardware, rel=1e-12)
    text = train_step_flops(model, 2, 512, with_images=False)
    model_flops, hardware = _closed_form(model, 2, 512, 0, 0, images=False)
    assert text["model"] == pytest.approx(model_flops, rel=1e-12)
    assert text["hardware"] == pytest.approx(hardware, rel=1e-12)


def test_14b_is_about_6n_plus_attention():
    model = repo_config("14b").model
    got = train_step_flops(model, 1, 8192, image_targets=0, image_positions=0)
    # Text only: 14.95B parameters less the 0.78B embedding table (no matmul) and the ~0.19B image path;
    # causal attention is half of dense.
    per_token = got["model"] / got["tokens"]
    assert 6 * 13.8e9 < per_token - 3 * 2 * 8192 * 40 * 128 * 48 < 6 * 14.2e9
