"""PSNR and SSIM on uint8 against float64 references computed another way (closed form; SSIM window by
window), on images of the golden VAE case's size."""

import numpy as np
import pytest

from nextstep_jax.training.image_metrics import gaussian_window, psnr, ssim


@pytest.fixture(scope="module")
def pair(load_case):
    _, c, h, w = load_case("h_vae")["img0_x"].shape
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (3, h, w, c), dtype=np.uint8)
    noise = rng.integers(-20, 21, a.shape)
    b = np.clip(a.astype(np.int64) + noise, 0, 255).astype(np.uint8)
    return a, b


def test_psnr(pair):
    a, b = pair
    mse = [np.mean((x.astype(np.float64) - y) ** 2) for x, y in zip(a, b)]
    np.testing.assert_allclose(psnr(a, b), [10 * np.log10(255.0**2 / m) for m in mse], rtol=1e-12)
    assert psnr(a[0], a[0]) == [np.inf]
    # Every pixel off by exactly 1 level: MSE 1, PSNR = 20·log10(255).
    one = np.full((1, 16, 16, 3), 100, np.uint8)
    np.testing.assert_allclose(psnr(one, one + 1), [20 * np.log10(255.0)], rtol=1e-12)


def _ssim_by_windows(x: np.ndarray, y: np.ndarray) -> float:
    """Mean SSIM of one [H, W, C] pair, each 11x11 window's weighted statistics computed directly."""
    w2 = np.outer(gaussian_window(), gaussian_window())
    k = w2.shape[0]
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    vals = []
    for ch in range(x.shape[2]):
        a, b = x[..., ch].astype(np.float64), y[..., ch].astype(np.float64)
        for i in range(a.shape[0] - k + 1):
            for j in range(a.shape[1] - k + 1):
                pa, pb = a[i:i + k, j:j + k], b[i:i + k, j:j + k]
                ma, mb = (w2 * pa).sum(), (w2 * pb).sum()
                va, vb = (w2 * (pa - ma) ** 2).sum(), (w2 * (pb - mb) ** 2).sum()
                cov = (w2 * (pa - ma) * (pb - mb)).sum()
                vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
    return float(np.mean(vals))


def test_ssim(pair):
    a, b = pair
    a, b = a[:2, :24, :20], b[:2, :24, :20]  # the direct reference is slow; a crop of the same pair
    np.testing.assert_allclose(ssim(a, b), [_ssim_by_windows(x, y) for x, y in zip(a, b)], rtol=1e-10)
    np.testing.assert_allclose(ssim(a, a), [1.0, 1.0], rtol=1e-12)
    assert np.all(ssim(a, b) < 1.0)


def test_bad_inputs():
    x = np.zeros((1, 16, 16, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        psnr(x.astype(np.float32), x)
    with pytest.raises(ValueError, match="shapes differ"):
        ssim(x, x[:, :15])
    with pytest.raises(ValueError, match="at least 11 px"):
        ssim(x[:, :10], x[:, :10])
