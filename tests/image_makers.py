"""Makers of encoded test images, good and deliberately bad (decompression bombs, truncated, 16-bit)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image


def encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels but holds almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def bomb_jpeg(width: int, height: int) -> bytes:
    """A small real JPEG with its SOF0 dimensions patched to width x height."""
    data = bytearray(encode(np.full((16, 16, 3), 128, np.uint8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def png16(height: int = 8, width: int = 8) -> bytes:
    arr = (np.arange(height * width, dtype=np.uint16).reshape(height, width) * 1000).astype(np.uint16)
    return encode(arr, "PNG")  # mode I;16


def gradient(height: int = 32, width: int = 48) -> np.ndarray:
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8)


def jpeg(array: np.ndarray | None = None, **kwargs) -> bytes:
    return encode(gradient() if array is None else array, "JPEG", quality=95, **kwargs)


def png(array: np.ndarray | None = None, **kwargs) -> bytes:
    return encode(gradient() if array is None else array, "PNG", **kwargs)


def truncated_jpeg() -> bytes:
    data = jpeg(gradient(64, 64))
    return data[: len(data) // 2]


def damaged_near_start() -> dict[str, bytes]:
    """Files broken in their first bytes, where Pillow fails inside Image.open rather than in load()."""
    png_bytes, jpeg_bytes = png(), jpeg()
    garbage = np.random.default_rng(0).integers(0, 256, 200, dtype=np.uint8).tobytes()
    damaged = {"png_signature_then_garbage.png": png_bytes[:8] + garbage}
    damaged |= {f"png_cut_{n}.png": png_bytes[:n] for n in (16, 20, 24)}
    damaged |= {f"jpeg_cut_{n}.jpg": jpeg_bytes[:n] for n in (8, 20, 50, 100)}
    return damaged
