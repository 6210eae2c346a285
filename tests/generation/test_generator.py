"""The compiled generation program: end-to-end parity with the official pipeline (golden i_pipeline_*
cases, recorded noise injected), determinism, batch independence, one trace per shape, text decoding."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest

from nextstep_jax.checkpoint import load_model, load_vae
from nextstep_jax.data.images import normalize
from nextstep_jax.generation.generator import Generator
from nextstep_jax.generation.settings import SamplingSettings
from nextstep_jax.models.nextstep import NextStep

# Golden README, end-to-end pipeline tolerances (absolute).
TOKENS_ATOL, LATENTS_ATOL, PIXELS_ATOL, UINT8_LEVELS = 1e-2, 3e-2, 1e-2, 2


@pytest.fixture(autouse=True)
def _highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture(scope="module")
def generator(golden_dir, tok):
    """Loaded as sample.py loads (scanned layers as stored): the Generator makes its own decode layout."""
    return Generator(*load_model(golden_dir / "model"), *load_vae(golden_dir / "vae"), tok)


@pytest.fixture(scope="module")
def fast(generator):
    """Two steps, text guidance 3 against "blurry", a 2x2 token grid (sizes from the golden model)."""
    side = 2 * generator.prompts.down_factor
    return SamplingSettings.from_config(num_steps=2, use_norm=True, guidance_scale=3.0, negative_prompt="blurry",
                                        hw=(side, side), length_bucket=1)


def _close(actual, expected, atol, what):
    err = float(np.max(np.abs(np.asarray(actual, np.float64) - expected)))
    assert err <= atol, f"{what}: max abs err {err:.3g} > {atol}"


def _nhwc(x):
    return np.asarray(x).transpose(0, 2, 3, 1)


def test_pipeline_parity(generator, pipeline_case):
    c, case = pipeline_case, pipeline_case.arrays
    n_per_caption = c.kwargs["num_images_per_caption"]
    rows = generator.prompts.rows(c.captions, c.settings, num_images_per_caption=n_per_caption,
                                  image_sizes=None if c.images is None else [im.shape[:2] for im in c.images])
    np.testing.assert_array_equal(rows.input_ids, case["input_ids"])
    n, m = case["tokens"].shape[:2]
    draws = case["fm_draws"]
    noises = draws.reshape(m, draws.shape[0] // m, *draws.shape[1:])
    vae_eps = None
    if "vae_draws" in case:
        eps = case["vae_draws"]
        vae_eps = _nhwc(eps.reshape(-1, *eps.shape[-3:]))
        np.testing.assert_array_equal(normalize(np.stack([c.images[i] for i in rows.image_rows])),
                                      _nhwc(case["pixel_values"]))
    out = generator.generate(c.captions, c.settings, images=c.images, num_images_per_caption=n_per_caption,
                             seed=c.kwargs["seed"], noises=noises, vae_eps=vae_eps)
    assert out.tokens.shape == (n, m, case["tokens"].shape[-1])
    _close(out.tokens, case["tokens"], TOKENS_ATOL, "tokens")
    _close(out.latents, _nhwc(case["latents"]), LATENTS_ATOL, "latents")
    _close(out.pixels, _nhwc(case["pixels"]), PIXELS_ATOL, "pixels")
    _close(out.images, case["images_uint8"], UINT8_LEVELS, "uint8 images")


def test_determinism_and_one_trace_per_shape(generator, fast):
    bucketed = dataclasses.replace(fast, length_bucket=16)
    rows_a = generator.prompts.rows(["a red fox"], bucketed)
    rows_b = generator.prompts.rows(["the blue cat"], bucketed)
    assert rows_a.input_ids.shape == rows_b.input_ids.shape
    before = generator.traces
    first = generator.generate(["a red fox"], bucketed, seed=1)
    again = generator.generate(["a red fox"], bucketed, seed=1)
    other_seed = generator.generate(["a red fox"], bucketed, seed=2)
    other_prompt = generator.generate(["the blue cat"], dataclasses.replace(bucketed, guidance_scale=5.0), seed=1)
    assert generator.traces == before + 1, "prompts, seeds and guidance of one shape must share one compilation"
    np.testing.assert_array_equal(first.images, again.images)
    np.testing.assert_array_equal(first.tokens, again.tokens)
    assert not np.array_equal(first.tokens, other_seed.tokens)
    assert not np.array_equal(first.tokens, other_prompt.tokens)
    # Extra left padding from the length bucket is invisible (positions exclude it).
    unbucketed = generator.generate(["a red fox"], fast, seed=1)
    _close(unbucketed.tokens, first.tokens, TOKENS_ATOL, "bucketed vs unbucketed tokens")


def test_batch_size_does_not_change_a_sample(generator, fast):
    """Each sample's noise comes from its own stream: a sample generated alone matches the same sample in a
    larger batch (up to float rounding, amplified autoregressively; golden README tolerances)."""
    both = generator.generate(["a red fox", "the blue cat"], fast, num_images_per_caption=2, seed=7)
    alone = generator.generate(["the blue cat"], fast, seed=7, sample_ids=[3])
    _close(alone.tokens[0], both.tokens[3], TOKENS_ATOL, "tokens")
    _close(alone.images[0], both.images[3], UINT8_LEVELS, "uint8 images")
    assert np.max(np.abs(both.tokens[2] - both.tokens[3])) > 0.1, "samples of one caption must differ"
    # Official noise_repeat tiling: image j of every caption shares noise j.
    shared = generator.generate(["a red fox", "the blue cat"], fast, num_images_per_caption=2, seed=7,
                                share_noise=True)
    first = generator.generate(["the blue cat"], fast, seed=7, sample_ids=[0])
    _close(first.tokens[0], shared.tokens[2], TOKENS_ATOL, "shared-noise tokens")


def test_text_decoding_then_image(generator, fast):
    """Greedy text equals a naive full-forward argmax loop, and the image after it equals generating from
    the prompt with that text written out (the waiting CFG row and the text row see their own sequences)."""
    cfg = generator.model.cfg
    with_text = dataclasses.replace(fast, text_tokens=5)
    rows = generator.prompts.rows(["a red fox"], with_text)
    out = generator.generate(["a red fox"], with_text, seed=3)
    generated = list(out.text_ids[0][: out.text_lengths[0]])

    # Naive reference: full forward without cache over a right-extended buffer (slot positions unchanged).
    width = rows.input_ids.shape[1]
    max_tokens = with_text.text_tokens
    buf = np.concatenate([rows.input_ids[:1], np.full((1, max_tokens), cfg.pad_token_id, np.int32)], 1)
    mask = np.concatenate([rows.attention_mask[:1], np.zeros((1, max_tokens), np.int32)], 1)
    forward = jax.jit(lambda i, m: generator.model.apply(
        generator.variables, generator.model.apply(generator.variables, i, None, m), method=NextStep.logits))
    expected = []
    for k in range(max_tokens):
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
    reference = generator.generate_rows(full, fast, seed=3)
    _close(out.tokens, reference.tokens, TOKENS_ATOL, "tokens after text vs written-out prompt")
