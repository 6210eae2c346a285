"""Numerical assertions shared by the tests."""

from __future__ import annotations

import numpy as np


def assert_close_rel(actual, expected, rel: float, where: str = "") -> None:
    """max|a - e| <= rel * max|e| (the golden README's per-tensor criterion)."""
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{where}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{where}: non-finite values"
    scale = max(float(np.max(np.abs(expected))), 1e-30)
    err = float(np.max(np.abs(actual - expected)))
    assert err <= rel * scale, f"{where}: max abs err {err:.3g} > {rel:g} * max|ref| {scale:.3g}"
