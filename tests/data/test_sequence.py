import json
import types

import numpy as np
import pytest

from nextstep_jax.data.samples import BadSample
from nextstep_jax.data.sequence import IGNORE_INDEX, ImagePart, layout_document

X = IGNORE_INDEX


def _official_prefix(load_case, case: str, pad: int) -> list[int]:
    row = load_case(case)["input_ids"][0].tolist()
    return [t for t in row if t != pad]


def _pipeline_call(golden_dir, case: str) -> tuple[str, tuple[int, int], int]:
    """(caption as the official pipeline writes it, output token grid, pixels per token) of golden case i."""
    call = json.loads((golden_dir / "cases" / f"{case}.json").read_text())
    vae = json.loads((golden_dir / "vae" / "config.json").read_text())
    model = json.loads((golden_dir / "model" / "config.json").read_text())
    per_token = 2 ** (len(vae["ch_mult"]) - 1) * model.get("latent_patch_size", model.get("patch_size"))
    # NextStepPipeline.generate_image appends the positive prompt after one space.
    caption = call["captions"] + (f" {call['positive_prompt']}" if call["positive_prompt"] else "")
    return caption, (call["hw"][0] // per_token, call["hw"][1] // per_token), per_token


def test_t2i_prefix_matches_official_pipeline(tokenizer, load_case, golden_dir):
    """The official NextStepPipeline built `caption <|image_area|>h*w <|begin_of_image|>` (golden case i)."""
    caption, grid, _ = _pipeline_call(golden_dir, "i_pipeline_t2i")
    layout = layout_document([caption, ImagePart(grid, True)], tokenizer)
    official = _official_prefix(load_case, "i_pipeline_t2i", tokenizer.special.pad)
    assert layout.input_ids[: len(official)].tolist() == official


def test_edit_prefix_matches_official_pipeline(tokenizer, load_case, golden_dir):
    caption, grid, per_token = _pipeline_call(golden_dir, "i_pipeline_edit")
    before, after = caption.split("<image>")
    height, width = load_case("i_pipeline_edit")["input_image_uint8"].shape[:2]
    parts = [before, ImagePart((height // per_token, width // per_token), False), after, ImagePart(grid, True)]
    layout = layout_document([p for p in parts if p != ""], tokenizer)
    official = _official_prefix(load_case, "i_pipeline_edit", tokenizer.special.pad)
    assert layout.input_ids[: len(official)].tolist() == official


def test_t2i_layout_by_hand(tokenizer, golden_special_ids):
    eos, area, boi, eoi, ph = (golden_special_ids[t] for t in (
        "<|endoftext|>", "<|image_area|>", "<|begin_of_image|>", "<|end_of_image|>", "<|image_placeholder|>"))
    caption = tokenizer.encode("a red circle")
    digits = tokenizer.encode("2*3")
    layout = layout_document(["a red circle", ImagePart((2, 3), True)], tokenizer)
    assert layout.input_ids.tolist() == caption + [area] + digits + [boi] + [ph] * 6 + [eoi, eos]
    assert layout.labels.tolist() == caption + [area] + digits + [X] + [X] * 6 + [eoi, X]
    assert layout.image_loss.tolist() == [0] * (len(caption) + 1 + len(digits) + 1) + [1] * 6 + [0, 0]
    assert tokenizer.decode(layout.input_ids) == (
        "a red circle<|image_area|>2*3<|begin_of_image|>" + "<|image_placeholder|>" * 6
        + "<|end_of_image|><|endoftext|>")


def test_dropped_caption_layout_keeps_caption_as_target(tokenizer):
    """Image first (generated unconditionally), caption after it; EOS after text is a target."""
    layout = layout_document([ImagePart((1, 2), True), "a red circle"], tokenizer)
    sp = tokenizer.special
    caption = tokenizer.encode("a red circle")
    prefix = [sp.image_area] + tokenizer.encode("1*2")
    assert layout.input_ids.tolist() == prefix + [sp.boi, sp.placeholder, sp.placeholder, sp.eoi] + caption + [sp.eos]
    assert layout.labels.tolist() == prefix + [X, X, X, sp.eoi] + caption + [sp.eos]
    assert layout.image_loss.tolist() == [0] * (len(prefix) + 1) + [1, 1] + [0] * (len(caption) + 2)


def test_edit_source_image_gets_no_image_loss(tokenizer):
    layout = layout_document([ImagePart((1, 1), False), "turn it blue", ImagePart((1, 1), True)], tokenizer)
    sp = tokenizer.special
    placeholders = np.flatnonzero(layout.input_ids == sp.placeholder)
    assert len(placeholders) == 2
    assert layout.image_loss[placeholders].tolist() == [0, 1]
    assert layout.image_loss.sum() == 1
    # The source image's EOI is still an LM target; the EOS right after the target's EOI is not.
    eois = np.flatnonzero(layout.input_ids == sp.eoi)
    assert layout.labels[eois].tolist() == [sp.eoi, sp.eoi]
    assert layout.labels[-1] == X and layout.input_ids[-1] == sp.eos


def test_text_only_document(tokenizer):
    layout = layout_document(["just some text"], tokenizer)
    ids = tokenizer.encode("just some text") + [tokenizer.special.eos]
    assert layout.input_ids.tolist() == ids and layout.labels.tolist() == ids
    assert not layout.image_loss.any()
    assert layout.input_ids.dtype == np.int32


def test_structural_ids_from_text_are_rejected():
    special = types.SimpleNamespace(eos=0, pad=1, image_area=2, boi=3, eoi=4, placeholder=5,
                                    structural=lambda: frozenset(range(6)))
    tok = types.SimpleNamespace(special=special, encode=lambda text: [7, 5] if "ph" in text else [7])
    assert layout_document(["ok"], tok).input_ids.tolist() == [7, 0]
    with pytest.raises(BadSample) as e:
        layout_document(["ph"], tok)
    assert e.value.reason == "special_token_in_text"
