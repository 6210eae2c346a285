"""Image decoding and geometry: safe decode to RGB, resize + centre crop, normalisation, bucketing.

Decoding never allocates a decompression bomb: the header is read first and images whose declared pixel
count exceeds ``max_pixels`` are rejected before any pixel is decoded.
"""

from __future__ import annotations

import io
import struct
import warnings

import numpy as np
from PIL import Image, ImageOps

from nextstep_jax.data.buckets import PIXELS_PER_TOKEN, nearest_grid
from nextstep_jax.data.samples import BadSample, EncodedImage, PixelImage

DEFAULT_MAX_PIXELS = 8192 * 8192
DECODABLE_FORMATS = frozenset({"JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "MPO"})
# Modes with a well-defined RGB meaning; 16/32-bit integer and float images are not.
SUPPORTED_MODES = frozenset({"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr"})
WHITE = (255, 255, 255)
# What Pillow raises for corrupt or truncated data, in the header (Image.open) or the pixels (load).
DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)


def open_image(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> Image.Image:
    """Open and fully decode ``data``; EXIF orientation applied; raises BadSample with a skip reason."""
    if not data:
        raise BadSample("empty_file")
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise BadSample("decompression_bomb", str(e)) from None
        except DECODE_ERRORS as e:
            raise BadSample("decode_error", str(e)) from None
    if img.format not in DECODABLE_FORMATS:
        raise BadSample("unsupported_format", str(img.format))
    width, height = img.size
    if width * height > max_pixels:
        raise BadSample("decompression_bomb", f"{width}x{height} > {max_pixels} pixels")
    if width < 1 or height < 1:
        raise BadSample("decode_error", f"{width}x{height}")
    if img.mode not in SUPPORTED_MODES:
        raise BadSample("unsupported_mode", img.mode)
    try:
        img.load()
        return ImageOps.exif_transpose(img)
    except DECODE_ERRORS as e:
        raise BadSample("decode_error", str(e)) from None


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB; transparency (LA, RGBA, PA, palette/L/RGB with a transparent colour) composited onto white."""
    if img.mode in ("LA", "RGBA", "PA") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, WHITE + (255,)), rgba).convert("RGB")
    return img.convert("RGB")


def decode_rgb(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Compressed bytes -> uint8 [H, W, 3] (EXIF-rotated, transparency on white)."""
    return np.asarray(to_rgb(open_image(data, max_pixels)))


def resize_center_crop(pixels: np.ndarray, height: int, width: int) -> np.ndarray:
    """Scale (Lanczos) so the image covers height x width, then crop the centre (official transform)."""
    src_h, src_w = pixels.shape[:2]
    if (src_h, src_w) == (height, width):
        return pixels
    scale = max(height / src_h, width / src_w)
    new_w, new_h = max(width, round(src_w * scale)), max(height, round(src_h * scale))
    img = Image.fromarray(pixels)
    if (new_w, new_h) != (src_w, src_h):
        img = img.resize((new_w, new_h), Image.Resampling.LANCZOS)
    left, top = (new_w - width) // 2, (new_h - height) // 2
    return np.asarray(img.crop((left, top, left + width, top + height)))


def normalize(pixels: np.ndarray) -> np.ndarray:
    """uint8 [0, 255] -> float32 [-1, 1] ((x/255 - 0.5) / 0.5)."""
    return pixels.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def bucketed_pixels(image, grids, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, tuple[int, int]]:
    """An encoded or decoded image -> (float32 [-1, 1] pixels cropped to its nearest bucket, token grid)."""
    if isinstance(image, EncodedImage):
        rgb = decode_rgb(image.data, max_pixels)
    elif isinstance(image, PixelImage):
        rgb = image.pixels
    else:
        raise TypeError(f"unknown image type {type(image).__name__}")
    grid = nearest_grid(rgb.shape[0], rgb.shape[1], grids)
    return normalize(resize_center_crop(rgb, grid[0] * PIXELS_PER_TOKEN, grid[1] * PIXELS_PER_TOKEN)), grid
