"""Prompt rows against the official pipeline's (golden i_pipeline_* cases) and the layout rules of
REFERENCE §7.3–7.5. Every size and setting comes from the golden files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from nextstep_jax.prompts import PromptError, PromptTokenizer, build_prompt_rows, cfg_mult_for

PIPELINE_CASES = ("i_pipeline_t2i", "i_pipeline_edit")


@pytest.fixture(scope="module")
def tok(golden_dir):
    return PromptTokenizer(golden_dir / "model")


def pipeline_case(golden_dir, load_case, name):
    """(kwargs json, arrays, captions, input images or None); skips cases this golden set lacks."""
    path = golden_dir / "cases" / f"{name}.json"
    if not path.is_file():
        pytest.skip(f"golden set has no {name}")
    kwargs = json.loads(path.read_text())
    case = load_case(name)
    captions = kwargs["captions"] if isinstance(kwargs["captions"], list) else [kwargs["captions"]]
    images = None
    if "input_image_uint8" in case:
        stacked = case["input_image_uint8"]
        images = [stacked] if stacked.ndim == 3 else list(stacked)
    return kwargs, case, captions, images


def rows_for(tok, kwargs, captions, images, down_factor=16, **extra):
    return build_prompt_rows(
        tok, captions, hw=tuple(kwargs["hw"]), down_factor=down_factor,
        image_sizes=None if images is None else [im.shape[:2] for im in images],
        num_images_per_caption=kwargs["num_images_per_caption"], positive_prompt=kwargs["positive_prompt"],
        negative_prompt=kwargs["negative_prompt"], cfg=kwargs["cfg"], cfg_img=kwargs["cfg_img"], **extra)


@pytest.mark.parametrize("name", PIPELINE_CASES)
def test_rows_identical_to_official(golden_dir, load_case, tok, name):
    kwargs, case, captions, images = pipeline_case(golden_dir, load_case, name)
    rows = rows_for(tok, kwargs, captions, images)
    np.testing.assert_array_equal(rows.input_ids, case["input_ids"])
    np.testing.assert_array_equal(rows.attention_mask, case["attention_mask"])
    assert [tok.decode(r) for r in rows.input_ids] == kwargs["tokens_decoded"]
    assert rows.cfg_mult * rows.num_samples == len(rows.input_ids)
    assert rows.pad_offset == 0


def test_cfg_layouts(tok):
    common = dict(hw=(64, 32), down_factor=16, negative_prompt="neg", num_images_per_caption=2)
    t2i = build_prompt_rows(tok, ["a", "b c"], cfg=3.0, **common)
    assert (t2i.cfg_mult, t2i.num_samples, t2i.grid) == (2, 4, (4, 2))
    texts = [tok.decode(r[m == 1]) for r, m in zip(t2i.input_ids, t2i.attention_mask)]
    prefix = "<|image_area|>4*2<|begin_of_image|>"
    assert texts == [f"a{prefix}", f"a{prefix}", f"b c{prefix}", f"b c{prefix}"] + [f"neg{prefix}"] * 4
    plain = build_prompt_rows(tok, ["a"], cfg=1.0, **common)
    assert plain.cfg_mult == 1 and len(plain.input_ids) == 2

    edit = build_prompt_rows(tok, ["<image>x"], cfg=3.0, cfg_img=2.0, image_sizes=[(32, 16)], **common)
    assert edit.cfg_mult == 3 and len(edit.input_ids) == 6
    block = "<|image_area|>2*1<|begin_of_image|>" + "<|image_placeholder|>" * 2 + "<|end_of_image|>"
    texts = [tok.decode(r[m == 1]) for r, m in zip(edit.input_ids, edit.attention_mask)]
    assert texts == [f"{block}x{prefix}"] * 2 + [f"{block}neg{prefix}"] * 2 + [f"neg{prefix}"] * 2
    assert edit.image_rows == (0, 0, 0, 0) and edit.image_copy == (0, 0, 1, 1)


def test_positive_prompt_joins_with_one_space(tok):
    rows = build_prompt_rows(tok, ["a cat"], hw=(16, 16), down_factor=16, positive_prompt="best quality.")
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
    rows = build_prompt_rows(tok, ["a"], hw=(16, 16), down_factor=16, cfg=2.0, negative_prompt="longer negative",
                             prepend_bos=True, bos_id=tok.special.eos, length_bucket=32, open_cond_rows=True)
    assert rows.input_ids.shape[1] == 32 and rows.open_rows == 1
    valid = [r[m == 1] for r, m in zip(rows.input_ids, rows.attention_mask)]
    assert list(valid[0]) == [tok.special.eos] + tok.encode("a")
    assert list(valid[1]) == [tok.special.eos] + tok.encode("longer negative") + list(rows.prefix)
    assert rows.pad_offset == 32 - max(len(v) for v in valid)


@pytest.mark.parametrize("kwargs,match", [
    (dict(cfg=1.0, cfg_img=2.0, captions=["<image>a"], image_sizes=[(16, 16)]), "needs text CFG"),
    (dict(hw=(100, 64)), "multiples of 16"),
    (dict(captions=["<image>a"], image_sizes=[(40, 16)]), "input image size"),
    (dict(captions=["<image>a"]), "no input image"),
    (dict(captions=["a"], image_sizes=[(16, 16)]), "exactly one"),
    (dict(captions=["<image><image>a"], image_sizes=[(16, 16)]), "exactly one"),
    (dict(captions=["a"], cfg=2.0, cfg_img=2.0), "needs an input image"),
    (dict(captions=["a <|foo|>"]), "unknown special token"),
    (dict(captions=[]), "no prompt"),
])
def test_rejections(tok, kwargs, match):
    args = dict(captions=["a"], hw=(64, 64), down_factor=16, cfg=3.0) | kwargs
    captions = args.pop("captions")
    with pytest.raises(PromptError, match=match):
        build_prompt_rows(tok, captions, **args)


def test_cfg_mult():
    assert [cfg_mult_for(1, 1), cfg_mult_for(7.5, 1), cfg_mult_for(7.5, 2), cfg_mult_for(0.5, 1)] == [1, 2, 3, 2]
