"""Mini GenEval for the "shapes" dataset (docs/shapes.md, "Scoring").

Each pixel is explained as a blend ``a·colour + (1 - a)·white`` of one palette colour; it belongs to that
colour when the blend fits (residual <= MAX_RESIDUAL) and the colour dominates (a >= 0.5), else it is
background. Connected components (8-neighbourhood) per colour smaller than 0.75 % of the image are
ignored; a component's shape comes from its fill ratio (pixels / bounding-box area; square ≈ 1, circle
≈ π/4, triangle ≈ 1/2, thresholds at the midpoints) and it must be roughly as wide as tall.
"""

from __future__ import annotations

import dataclasses
from collections import defaultdict
from typing import Iterable, Sequence

import numpy as np
from scipy import ndimage

from nextstep_jax.data.shapes import CATEGORIES, COLORS, PALETTE, parse_caption

MAX_RESIDUAL = 40.0  # RGB distance from the colour-white line still accepted as that colour
MIN_COMPONENT_FRACTION = 0.0075
SQUARE_MIN_FILL = (1.0 + np.pi / 4) / 2
CIRCLE_MIN_FILL = (np.pi / 4 + 0.5) / 2
TRIANGLE_MIN_FILL = 0.3
MAX_ASPECT = 1.5
RELATION_MIN_GAP = 0.2  # x image side

_COLORS = np.asarray([PALETTE[c] for c in COLORS], np.float64)


@dataclasses.dataclass(frozen=True)
class Detection:
    color: str
    shape: str  # circle | square | triangle | unknown
    center: tuple[float, float]  # (x, y) in pixels, bounding-box centre


def classify_pixels(image: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 3] -> int [H, W]: index into COLORS, or -1 for background."""
    p = image.astype(np.float64)
    white = np.float64(255.0)
    toward = white - _COLORS  # [K, 3], the direction from the colour to white
    offset = white - p  # [H, W, 3]
    alpha = np.clip(np.einsum("hwc,kc->hwk", offset, toward) / (toward**2).sum(-1), 0.0, 1.0)
    residual = np.linalg.norm(offset[..., None, :] - alpha[..., None] * toward, axis=-1)
    best = residual.argmin(-1)
    best_alpha = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    best_residual = np.take_along_axis(residual, best[..., None], -1)[..., 0]
    return np.where((best_alpha >= 0.5) & (best_residual <= MAX_RESIDUAL), best, -1)


def detect(image: np.ndarray) -> list[Detection]:
    labels = classify_pixels(image)
    height, width = labels.shape
    min_area = MIN_COMPONENT_FRACTION * height * width
    found = []
    for k, color in enumerate(COLORS):
        components, n = ndimage.label(labels == k, structure=np.ones((3, 3), bool))
        for sl, index in zip(ndimage.find_objects(components), range(1, n + 1)):
            area = int((components[sl] == index).sum())
            if area < min_area:
                continue
            h, w = sl[0].stop - sl[0].start, sl[1].stop - sl[1].start
            center = ((sl[1].start + sl[1].stop) / 2, (sl[0].start + sl[0].stop) / 2)
            found.append(Detection(color, _shape(area / (h * w), w / h), center))
    return found


def _shape(fill: float, aspect: float) -> str:
    if not 1 / MAX_ASPECT <= aspect <= MAX_ASPECT:
        return "unknown"
    if fill >= SQUARE_MIN_FILL:
        return "square"
    if fill >= CIRCLE_MIN_FILL:
        return "circle"
    if fill >= TRIANGLE_MIN_FILL:
        return "triangle"
    return "unknown"


def score(image: np.ndarray, caption: str) -> bool:
    """Whether ``image`` (uint8 [H, W, 3]) satisfies every claim of ``caption``."""
    claim = parse_caption(caption)
    height, width = image.shape[:2]
    found = detect(image)
    by_pair = defaultdict(list)
    for d in found:
        by_pair[(d.color, d.shape)].append(d.center)
    first = by_pair[claim.objects[0]]
    if claim.category == "single":
        return bool(first)
    if claim.category == "position":
        return any(_in_third(c, claim.where, width, height) for c in first)
    if claim.category == "counting":
        color, shape = claim.objects[0]
        same_color = [d for d in found if d.color == color]
        return len(same_color) == claim.count and all(d.shape == shape for d in same_color)
    second = by_pair[claim.objects[1]]
    if claim.category == "two_objects":
        return bool(first) and bool(second)
    return any(_related(a, b, claim.where, width, height) for a in first for b in second)


def _in_third(center: tuple[float, float], where: str, width: int, height: int) -> bool:
    x, y = center
    return {"left": x < width / 3, "right": x > 2 * width / 3,
            "top": y < height / 3, "bottom": y > 2 * height / 3}[where]


def _related(a, b, where: str, width: int, height: int) -> bool:
    (ax, ay), (bx, by) = a, b
    gx, gy = RELATION_MIN_GAP * width, RELATION_MIN_GAP * height
    return {"to the left of": bx - ax >= gx, "to the right of": ax - bx >= gx,
            "above": by - ay >= gy, "below": ay - by >= gy}[where]


def evaluate(images: Iterable[np.ndarray], captions: Sequence[str]) -> dict[str, float]:
    """Accuracy per category present, and ``overall`` = mean over those categories (GenEval style)."""
    return accuracies([score(image, caption) for image, caption in zip(images, captions, strict=True)], captions)


def accuracies(hits: Iterable[bool], captions: Sequence[str]) -> dict[str, float]:
    """``evaluate``'s summary of per-image verdicts ``hits`` (one per caption, in order)."""
    by_category: dict[str, list[bool]] = defaultdict(list)
    for hit, caption in zip(hits, captions, strict=True):
        by_category[parse_caption(caption).category].append(bool(hit))
    result = {c: float(np.mean(by_category[c])) for c in CATEGORIES if by_category[c]}
    result["overall"] = float(np.mean(list(result.values()))) if result else float("nan")
    return result
