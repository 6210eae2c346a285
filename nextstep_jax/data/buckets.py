"""Aspect-ratio buckets (the official ``aspect_ratio.py``): token grids (h, w), 16 px per token.

The official list holds 17 grids of ~256 tokens for 256 px training; for another ``image_size`` every grid
is scaled by ``(image_size / 16) / 16``. That is exact at 256 and 512 px (the official resolutions); for
other sizes we round half up and drop duplicates (the official code has no such case).
"""

from __future__ import annotations

from fractions import Fraction

PIXELS_PER_TOKEN = 16  # VAE down factor 8 x latent patch 2

BASE_GRIDS = (
    (8, 32), (9, 28), (10, 25), (11, 23), (12, 21), (13, 19), (14, 18), (15, 17), (16, 16),
    (17, 15), (18, 14), (19, 13), (21, 12), (23, 11), (25, 10), (28, 9), (32, 8),
)
BASE_SIDE = 16


def bucket_grids(image_size: int, multi_aspect: bool) -> tuple[tuple[int, int], ...]:
    """Token grids (h, w) allowed at ``image_size``; a single square grid without multi-aspect."""
    if image_size <= 0 or image_size % PIXELS_PER_TOKEN:
        raise ValueError(f"image_size {image_size} must be a positive multiple of {PIXELS_PER_TOKEN}")
    side = image_size // PIXELS_PER_TOKEN
    if not multi_aspect:
        return ((side, side),)
    scale = Fraction(side, BASE_SIDE)
    grids: list[tuple[int, int]] = []
    for h, w in BASE_GRIDS:
        grid = (max(1, _round_half_up(h * scale)), max(1, _round_half_up(w * scale)))
        if grid not in grids:
            grids.append(grid)
    return tuple(grids)


def nearest_grid(height: int, width: int, grids: tuple[tuple[int, int], ...]) -> tuple[int, int]:
    """The grid whose h/w is closest to height/width (absolute difference; first one wins ties)."""
    ratio = Fraction(height, width)
    return min(grids, key=lambda g: abs(Fraction(g[0], g[1]) - ratio))


def _round_half_up(x: Fraction) -> int:
    return int(x + Fraction(1, 2))
