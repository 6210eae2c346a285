import re

import numpy as np
import pytest

from nextstep_jax.data.shapes import (CATEGORIES, NOVEL_PAIRS, PALETTE, Claim, ShapesConfig, caption_of, generate,
                                      parse_caption)
from nextstep_jax.data.sources import ShapesSource

COLOR_RE = "red|green|blue|yellow|purple|orange"
SHAPE_RE = "circle|square|triangle"
OBJ = rf"(a (?!orange)|an (?=orange))({COLOR_RE}) ({SHAPE_RE})"
GRAMMAR = {
    "single": rf"{OBJ}",
    "position": rf"{OBJ} on the (left|right|top|bottom)",
    "counting": rf"(two|three) ({COLOR_RE}) ({SHAPE_RE})s",
    "two_objects": rf"{OBJ} and {OBJ}",
    "relation": rf"{OBJ} (to the left of|to the right of|above|below) {OBJ}",
}


def _samples(config: ShapesConfig, n: int):
    return [generate(config, i) for i in range(n)]


def test_captions_follow_the_grammar_and_roundtrip():
    seen = set()
    for s in _samples(ShapesConfig(size=32), 150):
        assert re.fullmatch(GRAMMAR[s.claim.category], s.caption), s.caption
        assert parse_caption(s.caption) == s.claim
        seen.add(s.claim.category)
        if s.claim.category in ("two_objects", "relation"):
            assert s.claim.objects[0] != s.claim.objects[1]
    assert seen == set(CATEGORIES)
    assert caption_of(Claim("relation", (("purple", "triangle"), ("orange", "circle")), where="above")) == \
        "a purple triangle above an orange circle"
    for bad in ("a orange circle", "an red circle", "a red circle.", "A red circle", "four red circles"):
        with pytest.raises(ValueError):
            parse_caption(bad)


def test_deterministic_by_seed_split_and_index():
    a, b = generate(ShapesConfig(seed=3), 17), generate(ShapesConfig(seed=3), 17)
    assert a.caption == b.caption and np.array_equal(a.image, b.image)
    others = [generate(ShapesConfig(seed=4), 17), generate(ShapesConfig(seed=3, split="eval"), 17),
              generate(ShapesConfig(seed=3), 18)]
    assert all(not np.array_equal(a.image, o.image) for o in others)


@pytest.mark.parametrize("size", [32, 64, 80])
def test_rendering_matches_the_layout(size):
    white = np.array([255, 255, 255])
    for s in _samples(ShapesConfig(size=size), 40):
        img = s.image.astype(int)
        assert img.shape == (size, size, 3) and s.image.dtype == np.uint8
        inside = np.zeros((size, size), bool)
        several = len(s.objects) > 1
        lo, hi = (0.20, 0.28) if several else (0.28, 0.38)
        for o in s.objects:
            assert lo * size <= o.side <= hi * size
            assert o.x0 >= 2 and o.y0 >= 2 and o.x0 + o.side <= size - 2 and o.y0 + o.side <= size - 2
            inside[o.y0:o.y0 + o.side, o.x0:o.x0 + o.side] = True
            cy, cx = int(o.y0 + o.side * 0.6), int(o.x0 + o.side / 2)  # inside every shape
            assert (img[cy, cx] == PALETTE[o.color]).all()
            assert (o.color, o.shape) in {(c, sh) for c, sh in s.claim.objects}
        assert (img[~inside] == 255).all(), "pixels outside every bounding box must be background"
        for i, a in enumerate(s.objects):  # >= 2 px between bounding boxes
            for b in s.objects[i + 1:]:
                gap_x = max(b.x0 - (a.x0 + a.side), a.x0 - (b.x0 + b.side))
                gap_y = max(b.y0 - (a.y0 + a.side), a.y0 - (b.y0 + b.side))
                assert max(gap_x, gap_y) >= 2
        # Every pixel is a blend of one palette colour with white.
        colors = np.array(list(PALETTE.values()))
        for px in np.unique(img[inside].reshape(-1, 3), axis=0):
            t = ((white - px) @ (white - colors).T) / ((white - colors) ** 2).sum(1)
            residual = np.linalg.norm(white - px - t[:, None] * (white - colors), axis=1)
            assert residual.min() < 1.5, px


def test_claims_hold_geometrically():
    size = 64
    for s in _samples(ShapesConfig(size=size), 200):
        c = s.claim
        if c.category == "counting":
            assert len(s.objects) == c.count
        if c.category == "position":
            x, y = s.objects[0].center
            assert {"left": x <= size / 3 - 1, "right": x >= 2 * size / 3 + 1,
                    "top": y <= size / 3 - 1, "bottom": y >= 2 * size / 3 + 1}[c.where]
        if c.category == "relation":
            (ax, ay), (bx, by) = s.objects[0].center, s.objects[1].center
            d = {"to the left of": bx - ax, "to the right of": ax - bx, "above": by - ay, "below": ay - by}[c.where]
            assert d >= 0.2 * size


def test_splits_hold_out_the_novel_pairs():
    for split in ("train", "eval"):
        for s in _samples(ShapesConfig(size=32, split=split), 120):
            assert not NOVEL_PAIRS.intersection(s.claim.objects)
    for s in _samples(ShapesConfig(size=32, split="novel"), 120):
        assert NOVEL_PAIRS.intersection(s.claim.objects)


def test_category_weights_and_validation():
    only_counting = ShapesConfig(category_weights=(0, 0, 1, 0, 0))
    assert {generate(only_counting, i).claim.category for i in range(20)} == {"counting"}
    small = ShapesConfig(size=16, category_weights=(1, 0, 1, 1, 1))
    assert all(s.image.shape == (16, 16, 3) for s in _samples(small, 30))
    with pytest.raises(ValueError, match="position"):
        ShapesConfig(size=16)
    with pytest.raises(ValueError, match="multiple of 16"):
        ShapesConfig(size=40)
    with pytest.raises(ValueError, match="split"):
        ShapesConfig(split="test")


@pytest.mark.parametrize("grid", [16, 24])
def test_caption_order_grid_names_the_first_drawn_object_first(grid):
    weights = (0, 0, 0, 1, 1)  # two objects and relations
    plain = _samples(ShapesConfig(size=48, category_weights=weights), 60)
    ordered = _samples(ShapesConfig(size=48, category_weights=weights, caption_order_grid=grid), 60)
    swapped = 0
    for a, b in zip(plain, ordered):
        np.testing.assert_array_equal(a.image, b.image)  # same picture, same objects
        assert sorted(a.objects, key=repr) == sorted(b.objects, key=repr)
        if a.claim.category == "relation":
            assert b.caption == a.caption
            continue
        assert b.claim.objects == tuple((o.color, o.shape) for o in b.objects)
        # The first named object's top-left corner lies in a cell no later in raster order than the second's.
        cells = [(o.y0 // grid) * 48 + o.x0 // grid for o in b.objects]
        assert cells[0] <= cells[1], (b.caption, b.objects)
        swapped += b.caption != a.caption
        assert set(parse_caption(b.caption).objects) == set(a.claim.objects)
    assert 0 < swapped < 60
    with pytest.raises(ValueError, match="caption_order_grid"):
        ShapesConfig(caption_order_grid=-1)


def test_source_yields_t2i_samples():
    source = ShapesSource(ShapesConfig(size=32, seed=1), num_samples=5)
    assert len(source) == 5
    sample = source[2]
    ref = generate(ShapesConfig(size=32, seed=1), 2)
    assert sample.kind == "t2i" and sample.texts == (ref.caption,)
    np.testing.assert_array_equal(sample.images[0].pixels, ref.image)
    with pytest.raises(IndexError):
        source[5]
