"""Reconstruction quality of uint8 images: PSNR and SSIM, per image, in float64 numpy (host side).

    psnr(reference, reconstruction)     # [N] dB; MSE over all pixels and channels of one image, peak 255
    ssim(reference, reconstruction)     # [N]; mean over channels of the mean SSIM map

Both take uint8 [N, H, W, C] (or one [H, W, C] image). PSNR of two identical images is +inf.

SSIM is the original definition (Wang et al. 2004): an 11x11 Gaussian window with sigma 1.5 over each channel,
K1 = 0.01, K2 = 0.03, dynamic range L = 255, statistics with the window's weights (biased), and the map taken
only where the window fits inside the image ("valid"), averaged. Images must be at least 11 px on each side.
"""

from __future__ import annotations

import numpy as np

PEAK = 255.0
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def _pair(reference, reconstruction) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(reference), np.asarray(reconstruction)
    for name, x in (("reference", a), ("reconstruction", b)):
        if x.dtype != np.uint8:
            raise ValueError(f"{name} images must be uint8, got {x.dtype}")
    if a.shape != b.shape:
        raise ValueError(f"image shapes differ: {a.shape} vs {b.shape}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"expected images [N, H, W, C] or [H, W, C], got shape {a.shape}")
    return a.astype(np.float64), b.astype(np.float64)


def psnr(reference, reconstruction) -> np.ndarray:
    """Peak signal-to-noise ratio in dB of each image pair, float64 [N]."""
    a, b = _pair(reference, reconstruction)
    mse = np.mean(np.square(a - b), axis=(1, 2, 3))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(PEAK**2 / mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
    """The normalised 1-D Gaussian; SSIM's 2-D window is its outer product with itself."""
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    w = np.exp(-(x**2) / (2 * sigma**2))
    return w / w.sum()


def _filter_valid(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Separable weighted sums over each ``len(w)`` x ``len(w)`` window that fits: [N, H, W, C] ->
    [N, H - k + 1, W - k + 1, C]."""
    k = len(w)
    rows = sum(w[i] * x[:, i:x.shape[1] - k + 1 + i] for i in range(k))
    return sum(w[j] * rows[:, :, j:x.shape[2] - k + 1 + j] for j in range(k))


def ssim(reference, reconstruction) -> np.ndarray:
    """Structural similarity of each image pair, float64 [N] (mean over the valid SSIM map and channels)."""
    a, b = _pair(reference, reconstruction)
    if min(a.shape[1:3]) < SSIM_WINDOW:
        raise ValueError(f"SSIM needs images of at least {SSIM_WINDOW} px per side, got {a.shape[1:3]}")
    w = gaussian_window()
    mu_a, mu_b = _filter_valid(a, w), _filter_valid(b, w)
    var_a = _filter_valid(a * a, w) - mu_a**2
    var_b = _filter_valid(b * b, w) - mu_b**2
    cov = _filter_valid(a * b, w) - mu_a * mu_b
    c1, c2 = (SSIM_K1 * PEAK) ** 2, (SSIM_K2 * PEAK) ** 2
    index = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return index.mean(axis=(1, 2, 3))
