"""Fixtures for the data tests: the golden tokenizer and makers of good and deliberately bad images."""

from __future__ import annotations

import io
import json
import struct
import types
import zlib

import numpy as np
import pytest
from PIL import Image



@pytest.fixture(scope="session")
def tokenizer(golden_dir):
    from nextstep_jax.data.tokenizer import load_tokenizer

    return load_tokenizer(golden_dir / "tokenizer")


@pytest.fixture(scope="session")
def golden_special_ids(golden_dir) -> dict[str, int]:
    return json.loads((golden_dir / "meta.json").read_text())["special_token_ids"]


def _encode(array: np.ndarray, fmt: str, **kwargs) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt, **kwargs)
    return buf.getvalue()


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _bomb_png(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height RGB pixels but holds almost no data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + _png_chunk(b"IEND", b""))


def _bomb_jpeg(width: int, height: int) -> bytes:
    """A small real JPEG with its SOF0 dimensions patched to width x height."""
    data = bytearray(_encode(np.full((16, 16, 3), 128, np.uint8), "JPEG"))
    sof = data.index(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, height, width)
    return bytes(data)


def _png16(height: int = 8, width: int = 8) -> bytes:
    arr = (np.arange(height * width, dtype=np.uint16).reshape(height, width) * 1000).astype(np.uint16)
    return _encode(arr, "PNG")  # mode I;16


@pytest.fixture(scope="session")
def images():
    """Makers of encoded test images."""

    def gradient(height: int = 32, width: int = 48) -> np.ndarray:
        y, x = np.mgrid[0:height, 0:width]
        return np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x + y) % 256], -1).astype(np.uint8)

    def jpeg(array: np.ndarray | None = None, **kwargs) -> bytes:
        return _encode(gradient() if array is None else array, "JPEG", quality=95, **kwargs)

    def png(array: np.ndarray | None = None, **kwargs) -> bytes:
        return _encode(gradient() if array is None else array, "PNG", **kwargs)

    def truncated_jpeg() -> bytes:
        data = jpeg(gradient(64, 64))
        return data[: len(data) // 2]

    return types.SimpleNamespace(gradient=gradient, jpeg=jpeg, png=png, truncated_jpeg=truncated_jpeg,
                                 bomb_png=_bomb_png, bomb_jpeg=_bomb_jpeg, png16=_png16, encode=_encode)
