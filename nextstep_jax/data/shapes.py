"""The built-in synthetic dataset "shapes" (docs/shapes.md), deterministic by (seed, split, index).

Coordinates: an object is an axis-aligned square bounding box [x0, x0+side) x [y0, y0+side) in pixels;
its centre is (x0 + side/2, y0 + side/2). Objects are drawn at 4x resolution and box-downsampled, so
edges are blends of one palette colour with white and interiors keep the exact palette colour.

Choices within that description: sides are integers in [ceil(a·S), floor(b·S)]; relation captions keep
centres apart by 0.2·S + 1 px (not just 0.2·S) so that the scorer, which measures centres from pixels to
within half a pixel, accepts every ground-truth image; S = 16 cannot hold a "position" object (the
centre cannot be 1 px inside a third with a 2 px border), so that category needs S >= 32.
"""

from __future__ import annotations

import dataclasses
import re
from fractions import Fraction

import numpy as np
from PIL import Image, ImageDraw

PALETTE = {
    "red": (220, 30, 30),
    "green": (30, 160, 60),
    "blue": (30, 70, 220),
    "yellow": (235, 200, 20),
    "purple": (140, 50, 180),
    "orange": (245, 130, 20),
}
COLORS = tuple(PALETTE)
SHAPES = ("circle", "square", "triangle")
CATEGORIES = ("single", "position", "counting", "two_objects", "relation")
POSITIONS = ("left", "right", "top", "bottom")
RELATIONS = ("to the left of", "to the right of", "above", "below")
COUNT_WORDS = {2: "two", 3: "three"}
NOVEL_PAIRS = frozenset({("red", "triangle"), ("blue", "circle"), ("yellow", "square")})
SPLITS = ("train", "eval", "novel")
BACKGROUND = (255, 255, 255)
BORDER = 2  # px between a bounding box and the canvas edge or another box
SUPERSAMPLE = 4
MAX_LAYOUT_ATTEMPTS = 10_000


@dataclasses.dataclass(frozen=True)
class Claim:
    """What a caption asserts: ``objects`` are (colour, shape) pairs; ``where`` a position or relation."""

    category: str
    objects: tuple[tuple[str, str], ...]
    count: int = 1
    where: str | None = None


@dataclasses.dataclass(frozen=True)
class Obj:
    color: str
    shape: str
    x0: int
    y0: int
    side: int

    @property
    def center(self) -> tuple[float, float]:
        return (self.x0 + self.side / 2, self.y0 + self.side / 2)


@dataclasses.dataclass(frozen=True, eq=False)
class ShapesSample:
    caption: str
    claim: Claim
    objects: tuple[Obj, ...]
    image: np.ndarray  # uint8 [S, S, 3]


@dataclasses.dataclass(frozen=True)
class ShapesConfig:
    size: int = 64
    seed: int = 0
    split: str = "train"
    category_weights: tuple[float, ...] = (1.0,) * len(CATEGORIES)  # in CATEGORIES order
    # 0: a two-object caption names its objects in the order they were sampled. g > 0: it names first the object
    # whose bounding box's top-left corner falls first, in raster order, on a grid of g-pixel cells: the object
    # whose image tokens an autoregressive model with g-pixel tokens starts to draw first. Both orders describe
    # the same image; this one tells such a model which of the two its first tokens belong to (a choice for
    # training captions: held-out prompts keep the sampled order).
    caption_order_grid: int = 0

    def __post_init__(self):
        if self.size < 16 or self.size % 16:
            raise ValueError(f"shapes size {self.size} must be a positive multiple of 16")
        if self.split not in SPLITS:
            raise ValueError(f"split {self.split!r} not in {SPLITS}")
        w = self.category_weights
        if len(w) != len(CATEGORIES) or min(w) < 0 or sum(w) <= 0:
            raise ValueError(f"category_weights must be {len(CATEGORIES)} non-negative numbers, not all 0")
        if w[CATEGORIES.index("position")] > 0 and self.size < 32:
            raise ValueError("'position' captions need size >= 32; give that category weight 0")
        if self.caption_order_grid < 0:
            raise ValueError(f"caption_order_grid must be >= 0, got {self.caption_order_grid}")


def caption_of(claim: Claim) -> str:
    def a(color: str, shape: str) -> str:
        return f"{'an' if color == 'orange' else 'a'} {color} {shape}"

    (c1, s1), *rest = claim.objects
    if claim.category == "single":
        return a(c1, s1)
    if claim.category == "position":
        return f"{a(c1, s1)} on the {claim.where}"
    if claim.category == "counting":
        return f"{COUNT_WORDS[claim.count]} {c1} {s1}s"
    (c2, s2), = rest
    if claim.category == "two_objects":
        return f"{a(c1, s1)} and {a(c2, s2)}"
    return f"{a(c1, s1)} {claim.where} {a(c2, s2)}"


_OBJ = rf"an? ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})"
_PATTERNS = (
    ("position", re.compile(rf"{_OBJ} on the ({'|'.join(POSITIONS)})")),
    ("counting", re.compile(rf"({'|'.join(COUNT_WORDS.values())}) ({'|'.join(COLORS)}) ({'|'.join(SHAPES)})s")),
    ("two_objects", re.compile(rf"{_OBJ} and {_OBJ}")),
    ("relation", re.compile(rf"{_OBJ} ({'|'.join(RELATIONS)}) {_OBJ}")),
    ("single", re.compile(_OBJ)),
)


def parse_caption(caption: str) -> Claim:
    """Inverse of caption_of; raises ValueError for text outside the grammar."""
    for category, pattern in _PATTERNS:
        m = pattern.fullmatch(caption)
        if not m:
            continue
        g = m.groups()
        if category == "single":
            claim = Claim("single", ((g[0], g[1]),))
        elif category == "position":
            claim = Claim("position", ((g[0], g[1]),), where=g[2])
        elif category == "counting":
            count = {v: k for k, v in COUNT_WORDS.items()}[g[0]]
            claim = Claim("counting", ((g[1], g[2]),), count=count)
        elif category == "two_objects":
            claim = Claim("two_objects", ((g[0], g[1]), (g[2], g[3])))
        else:
            claim = Claim("relation", ((g[0], g[1]), (g[3], g[4])), where=g[2])
        if caption_of(claim) == caption:  # also checks the article ("a" / "an")
            return claim
    raise ValueError(f"not a shapes caption: {caption!r}")


def generate(config: ShapesConfig, index: int) -> ShapesSample:
    """Sample ``index`` of the split: caption, claim, layout and rendered image."""
    if index < 0:
        raise IndexError(index)
    rng = np.random.default_rng([config.seed, SPLITS.index(config.split), index])
    weights = np.asarray(config.category_weights, np.float64)
    category = CATEGORIES[rng.choice(len(CATEGORIES), p=weights / weights.sum())]
    claim = _sample_claim(category, config.split, rng)
    objects = _sample_layout(claim, config.size, rng)
    if claim.category == "two_objects" and config.caption_order_grid:
        claim, objects = _in_raster_order(claim, objects, config.caption_order_grid)
    return ShapesSample(caption_of(claim), claim, objects, render(objects, config.size))


def _in_raster_order(claim: Claim, objects: tuple[Obj, ...], grid: int) -> tuple[Claim, tuple[Obj, ...]]:
    first, second = objects
    if (second.y0 // grid, second.x0 // grid) < (first.y0 // grid, first.x0 // grid):
        return dataclasses.replace(claim, objects=claim.objects[::-1]), objects[::-1]
    return claim, objects


def _sample_claim(category: str, split: str, rng: np.random.Generator) -> Claim:
    def pair() -> tuple[str, str]:
        return COLORS[rng.integers(len(COLORS))], SHAPES[rng.integers(len(SHAPES))]

    while True:
        first = pair()
        if category == "single":
            claim = Claim(category, (first,))
        elif category == "position":
            claim = Claim(category, (first,), where=POSITIONS[rng.integers(len(POSITIONS))])
        elif category == "counting":
            claim = Claim(category, (first,), count=int(rng.integers(2, 4)))
        else:
            second = pair()
            if second == first:
                continue
            where = RELATIONS[rng.integers(len(RELATIONS))] if category == "relation" else None
            claim = Claim(category, (first, second), where=where)
        has_novel = any(p in NOVEL_PAIRS for p in claim.objects)
        if has_novel == (split == "novel"):
            return claim


def _side_range(size: int, several: bool) -> tuple[int, int]:
    lo, hi = (20, 28) if several else (28, 38)
    return -(-lo * size // 100), hi * size // 100


def _sample_layout(claim: Claim, size: int, rng: np.random.Generator) -> tuple[Obj, ...]:
    pairs = claim.objects * claim.count if claim.category == "counting" else claim.objects
    lo, hi = _side_range(size, several=len(pairs) > 1)
    for _ in range(MAX_LAYOUT_ATTEMPTS):
        objs = []
        for color, shape in pairs:
            side = int(rng.integers(lo, hi + 1))
            xs, ys = _coordinate_ranges(claim, size, side)
            if xs[0] > xs[1] or ys[0] > ys[1]:
                break
            objs.append(Obj(color, shape, int(rng.integers(xs[0], xs[1] + 1)), int(rng.integers(ys[0], ys[1] + 1)),
                            side))
        else:
            if _separated(objs) and _relation_holds(claim, objs, size):
                return tuple(objs)
    raise RuntimeError(f"no layout found for {caption_of(claim)!r} at size {size}")


def _coordinate_ranges(claim: Claim, size: int, side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Inclusive ranges of x0 and y0: inside the border and, for position claims, in the named third."""
    free = (BORDER, size - BORDER - side)
    if claim.category != "position":
        return free, free
    half, third = Fraction(side, 2), Fraction(size, 3)
    if claim.where in ("left", "top"):  # centre <= S/3 - 1
        constrained = (BORDER, min(free[1], int(np.floor(third - 1 - half))))
    else:  # centre >= 2S/3 + 1
        constrained = (max(BORDER, int(np.ceil(2 * third + 1 - half))), free[1])
    return (constrained, free) if claim.where in ("left", "right") else (free, constrained)


def _separated(objs: list[Obj]) -> bool:
    for i, a in enumerate(objs):
        for b in objs[i + 1:]:
            apart_x = a.x0 + a.side + BORDER <= b.x0 or b.x0 + b.side + BORDER <= a.x0
            apart_y = a.y0 + a.side + BORDER <= b.y0 or b.y0 + b.side + BORDER <= a.y0
            if not (apart_x or apart_y):
                return False
    return True


def _relation_holds(claim: Claim, objs: list[Obj], size: int) -> bool:
    if claim.category != "relation":
        return True
    (ax, ay), (bx, by) = objs[0].center, objs[1].center
    gap = 0.2 * size + 1
    return {
        "to the left of": bx - ax >= gap,
        "to the right of": ax - bx >= gap,
        "above": by - ay >= gap,
        "below": ay - by >= gap,
    }[claim.where]


def render(objects: tuple[Obj, ...], size: int) -> np.ndarray:
    f = SUPERSAMPLE
    canvas = Image.new("RGB", (size * f, size * f), BACKGROUND)
    draw = ImageDraw.Draw(canvas)
    for o in objects:
        # Inclusive supersampled box, so nothing is drawn outside [x0, x0+side) at the final resolution.
        left, top = o.x0 * f, o.y0 * f
        right, bottom = (o.x0 + o.side) * f - 1, (o.y0 + o.side) * f - 1
        color = PALETTE[o.color]
        if o.shape == "circle":
            draw.ellipse((left, top, right, bottom), fill=color)
        elif o.shape == "square":
            draw.rectangle((left, top, right, bottom), fill=color)
        else:
            draw.polygon(((left + right) / 2, top, left, bottom, right, bottom), fill=color)
    return np.asarray(canvas.reduce(f))
