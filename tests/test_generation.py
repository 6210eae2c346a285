"""The compiled generation program: end-to-end parity with the official pipeline (golden i_pipeline_*
cases, recorded noise injected), determinism, batch independence, one trace per shape, text decoding."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from nextstep_jax.checkpoint.load import load_vae
from nextstep_jax.data.images import normalize
from nextstep_jax.generation import Generator, SamplerSettings, cfg_at
from nextstep_jax.models.nextstep import NextStep
from nextstep_jax.prompts import PromptTokenizer, build_prompt_rows
from nextstep_jax.text_decoding import TextSettings
from test_prompts import PIPELINE_CASES, pipeline_case, rows_for

# Golden README, end-to-end pipeline tolerances (absolute).
TOKENS_ATOL, LATENTS_ATOL, PIXELS_ATOL, UINT8_LEVELS = 1e-2, 3e-2, 1e-2, 2
FAST = SamplerSettings(num_steps=2, use_norm=True)


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def generator(golden_dir, golden_model):
    cfg, variables = golden_model(scan_layers=False, fused=True)  # the layout sample.py loads
    vae_cfg, vae_params = load_vae(golden_dir / "vae")
    return Generator(cfg, variables["params"], vae_cfg, vae_params)


@pytest.fixture(scope="module")
def tok(golden_dir):
    return PromptTokenizer(golden_dir / "model")


def _close(actual, expected, atol, what):
    err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
    assert err <= atol, f"{what}: max abs err {err:.3g} > {atol}"


def _nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_pipeline_parity(golden_dir, load_case, generator, tok, name):
    kwargs, case, captions, images = pipeline_case(golden_dir, load_case, name)
    rows = rows_for(tok, kwargs, captions, images, down_factor=generator.down_factor)
    np.testing.assert_array_equal(rows.input_ids, case["input_ids"])
    sampler = SamplerSettings(num_steps=kwargs["num_sampling_steps"], timesteps_shift=kwargs["timesteps_shift"],
                              cfg_schedule=kwargs["cfg_schedule"], use_norm=kwargs["use_norm"])
    n, m = case["tokens"].shape[:2]
    draws = case["fm_draws"]
    noises = draws.reshape(m, draws.shape[0] // m, *draws.shape[1:])
    vae_eps = None
    if "vae_draws" in case:
        eps = case["vae_draws"]
        vae_eps = _nhwc(eps.reshape(-1, *eps.shape[-3:]))
        np.testing.assert_array_equal(normalize(np.stack([images[i] for i in rows.image_rows])),
                                      _nhwc(case["pixel_values"]))
    out = generator.generate(rows, sampler, cfg=kwargs["cfg"], cfg_img=kwargs["cfg_img"], seed=kwargs["seed"],
                             images=images, noises=noises, vae_eps=vae_eps)
    assert out.tokens.shape == (n, m, case["tokens"].shape[-1])
    _close(out.tokens, case["tokens"], TOKENS_ATOL, "tokens")
    _close(out.latents, _nhwc(case["latents"]), LATENTS_ATOL, "latents")
    _close(out.pixels, _nhwc(case["pixels"]), PIXELS_ATOL, "pixels")
    _close(out.images, case["images_uint8"], UINT8_LEVELS, "uint8 images")


def _t2i(tok, generator, captions, n=1, cfg=3.0, **kw):
    return build_prompt_rows(tok, captions, hw=(2 * generator.down_factor,) * 2, down_factor=generator.down_factor,
                             num_images_per_caption=n, cfg=cfg, negative_prompt="blurry", **kw)


def test_determinism_and_one_trace_per_shape(generator, tok):
    rows_a = _t2i(tok, generator, ["a red fox"], length_bucket=16)
    rows_b = _t2i(tok, generator, ["the blue cat"], length_bucket=16)
    assert rows_a.input_ids.shape == rows_b.input_ids.shape
    before = generator.traces
    first = generator.generate(rows_a, FAST, cfg=3.0, seed=1)
    again = generator.generate(rows_a, FAST, cfg=3.0, seed=1)
    other_seed = generator.generate(rows_a, FAST, cfg=3.0, seed=2)
    other_prompt = generator.generate(rows_b, FAST, cfg=5.0, seed=1)
    assert generator.traces == before + 1, "prompts, seeds and cfg of one shape must share one compilation"
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other_seed.tokens)
    assert not np.array_equal(first.tokens, other_prompt.tokens)
    # Extra left padding from the length bucket is invisible (positions exclude it).
    unbucketed = generator.generate(_t2i(tok, generator, ["a red fox"]), FAST, cfg=3.0, seed=1)
    _close(unbucketed.tokens, first.tokens, TOKENS_ATOL, "bucketed vs unbucketed tokens")


def test_batch_size_does_not_change_a_sample(generator, tok):
    """Each sample's noise comes from its own stream: a sample generated alone matches the same sample in a
    larger batch (up to float rounding, amplified autoregressively; golden README tolerances)."""
    both = generator.generate(_t2i(tok, generator, ["a red fox", "the blue cat"], n=2), FAST, cfg=3.0, seed=7)
    alone = generator.generate(_t2i(tok, generator, ["the blue cat"]), FAST, cfg=3.0, seed=7, sample_ids=[3])
    _close(alone.tokens[0], both.tokens[3], TOKENS_ATOL, "tokens")
    _close(alone.images[0], both.images[3], UINT8_LEVELS, "uint8 images")
    assert np.max(np.abs(both.tokens[2] - both.tokens[3])) > 0.1, "samples of one caption must differ"
    # Official noise_repeat tiling: image j of every caption shares noise j.
    shared = generator.generate(_t2i(tok, generator, ["a red fox", "the blue cat"], n=2), FAST, cfg=3.0, seed=7,
                                share_noise=True)
    first = generator.generate(_t2i(tok, generator, ["the blue cat"]), FAST, cfg=3.0, seed=7, sample_ids=[0])
    _close(first.tokens[0], shared.tokens[2], TOKENS_ATOL, "shared-noise tokens")


def test_text_decoding_then_image(generator, tok):
    """Greedy text equals a naive full-forward argmax loop, and the image after it equals generating from
    the prompt with that text written out (the waiting CFG row and the text row see their own sequences)."""
    cfg = generator.model.cfg
    text = TextSettings(max_tokens=5)
    rows = _t2i(tok, generator, ["a red fox"], open_cond_rows=True)
    out = generator.generate(rows, FAST, cfg=3.0, seed=3, text=text)
    generated = list(out.text_ids[0][: out.text_lengths[0]])

    # Naive reference: full forward without cache over a right-extended buffer (slot positions unchanged).
    width = rows.input_ids.shape[1]
    buf = np.concatenate([rows.input_ids[:1], np.full((1, text.max_tokens), cfg.pad_token_id, np.int32)], 1)
    mask = np.concatenate([rows.attention_mask[:1], np.zeros((1, text.max_tokens), np.int32)], 1)
    forward = jax.jit(lambda i, m: generator.model.apply(
        generator.variables, generator.model.apply(generator.variables, i, None, m), method=NextStep.logits))
    expected = []
    for k in range(text.max_tokens):
        logits = np.array(forward(buf, mask)[0, width - 1 + k])
        logits[[cfg.pad_token_id, cfg.image_placeholder_id, cfg.eoi]] = -np.inf
        nxt = int(np.argmax(logits))
        if nxt in (rows.prefix[0], rows.prefix[-1], cfg.eos_token_id):
            break
        expected.append(nxt)
        buf[0, width + k], mask[0, width + k] = nxt, 1
    assert generated == expected

    ids = list(rows.input_ids[0][rows.attention_mask[0] == 1]) + expected
    written = [ids + list(rows.prefix), list(rows.input_ids[1][rows.attention_mask[1] == 1])]
    width = max(map(len, written))
    full_ids = np.full((2, width), cfg.pad_token_id, np.int32)
    full_mask = np.zeros((2, width), np.int32)
    for i, r in enumerate(written):
        full_ids[i, width - len(r):], full_mask[i, width - len(r):] = r, 1
    full = dataclasses.replace(rows, input_ids=full_ids, attention_mask=full_mask, open_rows=0, pad_offset=0)
    reference = generator.generate(full, FAST, cfg=3.0, seed=3)
    _close(out.tokens, reference.tokens, TOKENS_ATOL, "tokens after text vs written-out prompt")


def test_cfg_schedules():
    assert cfg_at("constant", 7.5, 3, 10) == 7.5
    assert cfg_at("linear", 7.5, 0, 10) == 7.5 and cfg_at("linear", 7.5, 5, 10) == pytest.approx(4.25)
    assert float(cfg_at("linear_increasing", 7.5, 0, 10)) == pytest.approx(3.75)
    assert float(cfg_at("linear_increasing", 7.5, 10, 10)) == pytest.approx(7.5)
