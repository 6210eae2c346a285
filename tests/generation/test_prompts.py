"""Prompt rows against the official pipeline's (golden i_pipeline_* cases) and the layout rules of
docs/model.md. Every size and setting comes from the golden files."""

from __future__ import annotations

import numpy as np
import pytest

from nextstep_jax.generation.prompts import PromptError, build_prompt_rows
from nextstep_jax.generation.settings import SamplingSettings, SettingsError


def _settings(**changes) -> SamplingSettings:
    """The rule tests' settings: no guidance and no length bucket unless a test sets them."""
    return SamplingSettings.from_config(**({"guidance_scale": 1.0, "length_bucket": 1} | changes))


def test_rows_identical_to_official(prompts, tok, pipeline_case):
    c = pipeline_case
    rows = prompts.rows(c.captions, c.settings, num_images_per_caption=c.kwargs["num_images_per_caption"],
                        image_sizes=None if c.images is None else [im.shape[:2] for im in c.images])
    np.testing.assert_array_equal(rows.input_ids, c.arrays["input_ids"])
    np.testing.assert_array_equal(rows.attention_mask, c.arrays["attention_mask"])
    assert [tok.decode(r) for r in rows.input_ids] == c.kwargs["tokens_decoded"]
    assert rows.cfg_mult * rows.num_samples == len(rows.input_ids)
    assert rows.pad_offset == 0


def test_cfg_layouts(tok):
    common = dict(down_factor=16, num_images_per_caption=2)
    t2i = build_prompt_rows(tok, ["a", "b c"], _settings(hw=(64, 32), negative_prompt="neg", guidance_scale=3.0),
                            **common)
    assert (t2i.cfg_mult, t2i.num_samples, t2i.grid) == (2, 4, (4, 2))
    texts = [tok.decode(r[m == 1]) for r, m in zip(t2i.input_ids, t2i.attention_mask)]
    prefix = "<|image_area|>4*2<|begin_of_image|>"
    assert texts == [f"a{prefix}", f"a{prefix}", f"b c{prefix}", f"b c{prefix}"] + [f"neg{prefix}"] * 4
    plain = build_prompt_rows(tok, ["a"], _settings(hw=(64, 32), negative_prompt="neg"), **common)
    assert plain.cfg_mult == 1 and len(plain.input_ids) == 2

    edit = build_prompt_rows(tok, ["<image>x"], _settings(hw=(64, 32), negative_prompt="neg", guidance_scale=3.0,
                                                          image_guidance_scale=2.0),
                             image_sizes=[(32, 16)], **common)
    assert edit.cfg_mult == 3 and len(edit.input_ids) == 6
    block = "<|image_area|>2*1<|begin_of_image|>" + "<|image_placeholder|>" * 2 + "<|end_of_image|>"
    texts = [tok.decode(r[m == 1]) for r, m in zip(edit.input_ids, edit.attention_mask)]
    assert texts == [f"{block}x{prefix}"] * 2 + [f"{block}neg{prefix}"] * 2 + [f"neg{prefix}"] * 2
    assert edit.image_rows == (0, 0, 0, 0) and edit.image_copy == (0, 0, 1, 1)


def test_positive_prompt_joins_with_one_space(tok):
    rows = build_prompt_rows(tok, ["a cat"], _settings(hw=(16, 16), positive_prompt="best quality."), down_factor=16)
    valid = rows.input_ids[0][rows.attention_mask[0] == 1]
    assert list(valid[: -len(rows.prefix)]) == tok.encode("a cat best quality.")


def test_special_tokens_in_text(tok):
    think = tok.encode("x<|begin_of_thinking|>y")
    assert tok.token_id("<|begin_of_thinking|>") in think
    with pytest.raises(PromptError, match="unknown special token"):
        tok.encode("a <|not_a_token|> b")
    with pytest.raises(PromptError, match="structural"):
        tok.encode("a <|image_placeholder|>")


def test_bos_bucket_and_open_rows(tok):
    settings = _settings(hw=(16, 16), guidance_scale=2.0, negative_prompt="longer negative", prepend_bos=True,
                         length_bucket=32, text_tokens=1)
    rows = build_prompt_rows(tok, ["a"], settings, down_factor=16, bos_id=tok.special.eos)
    assert rows.input_ids.shape[1] == 32 and rows.open_rows == 1
    valid = [r[m == 1] for r, m in zip(rows.input_ids, rows.attention_mask)]
    assert list(valid[0]) == [tok.special.eos] + tok.encode("a")
    assert list(valid[1]) == [tok.special.eos] + tok.encode("longer negative") + list(rows.prefix)
    assert rows.pad_offset == 32 - max(len(v) for v in valid)


@pytest.mark.parametrize("kwargs,match", [
    (dict(hw=(100, 64)), "multiples of 16"),
    (dict(captions=["<image>a"], image_sizes=[(40, 16)]), "input image size"),
    (dict(captions=["<image>a"]), "no input image"),
    (dict(captions=["a"], image_sizes=[(16, 16)]), "exactly one"),
    (dict(captions=["<image><image>a"], image_sizes=[(16, 16)]), "exactly one"),
    (dict(captions=["a"], guidance_scale=2.0, image_guidance_scale=2.0), "needs an input image"),
    (dict(captions=["a <|foo|>"]), "unknown special token"),
    (dict(captions=[]), "no prompt"),
])
def test_rejections(tok, kwargs, match):
    args = dict(captions=["a"], hw=(64, 64), guidance_scale=3.0) | kwargs
    captions, image_sizes = args.pop("captions"), args.pop("image_sizes", None)
    with pytest.raises(PromptError, match=match):
        build_prompt_rows(tok, captions, _settings(**args), down_factor=16, image_sizes=image_sizes)


def test_image_guidance_needs_text_guidance():
    with pytest.raises(SettingsError, match="needs text CFG"):
        _settings(guidance_scale=1.0, image_guidance_scale=2.0)
