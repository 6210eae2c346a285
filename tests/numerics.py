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


def linear_field(rng, dim: int, cond_dim: int):
    """A random velocity field v = x·A + t·b + c·W: (jax function, its float64 numpy twin)."""
    a = rng.normal(0, 0.3, (dim, dim)).astype(np.float32)
    b = rng.normal(0, 1, dim).astype(np.float32)
    w = rng.normal(0, 0.3, (cond_dim, dim)).astype(np.float32)
    jax_fn = lambda x, t, c: x @ a + t[:, None] * b + c @ w  # noqa: E731
    np_fn = lambda x, t, c: x @ a.astype(np.float64) + t[:, None] * b + c @ w.astype(np.float64)  # noqa: E731
    return jax_fn, np_fn
