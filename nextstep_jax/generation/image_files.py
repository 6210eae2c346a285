"""Image files for sampling: reading edit inputs, writing PNGs (with text chunks) and sidecars atomically.

Writes go through ``io.atomic``, so an interrupted run never leaves a truncated file under a final name.
PNG bytes depend only on pixels and text chunks (no timestamps), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from nextstep_jax.data.images import open_image, to_rgb
from nextstep_jax.data.samples import BadSample
from nextstep_jax.io.atomic import write_file


class ImageFileError(ValueError):
    pass


def load_rgb(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """uint8 [H, W, 3] of the image at ``path`` (EXIF orientation applied, alpha over white, with the data
    builder's decoding guards), resized with bicubic filtering to ``size`` = (H, W) when given (the official
    example resizes its input)."""
    path = Path(path)
    if not path.is_file():
        raise ImageFileError(f"input image {path} does not exist")
    try:
        img = to_rgb(open_image(path.read_bytes()))
    except BadSample as e:
        raise ImageFileError(f"cannot decode input image {path}: {e}") from None
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(img)


def check_output_folder(path: str | Path) -> None:
    """Fail now, before any long work, if ``path`` cannot be (or become) a folder to write into."""
    path = Path(path).absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ImageFileError(f"output folder {path}: {existing} is not a folder")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ImageFileError(f"output folder {path}: {existing} is not writable")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_file(path, data)


def png_bytes(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_png(path: str | Path, image: np.ndarray, text: dict[str, str] | None = None) -> None:
    """uint8 [H, W, 3] -> PNG with international text chunks (UTF-8 prompts), written atomically."""
    _write(Path(path), png_bytes(image, text))


def write_json(path: str | Path, obj) -> None:
    _write(Path(path), (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def write_sample(stem: Path, image: np.ndarray, record: dict) -> list[Path]:
    """``stem``.png (prompt, seed and the ``record`` JSON in text chunks) and the same JSON as ``stem``.json."""
    png, sidecar = stem.with_suffix(".png"), stem.with_suffix(".json")
    write_png(png, image, {"prompt": record["prompt"], "seed": str(record["seed"]),
                           "settings": json.dumps(record, ensure_ascii=False), "software": "nextstep_jax"})
    write_json(sidecar, record)
    return [png, sidecar]


def grid(images: list[np.ndarray], columns: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile same-size uint8 images row-major on a white background."""
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    h, w, c = images[0].shape
    out = np.full((rows * h + (rows - 1) * pad, columns * w + (columns - 1) * pad, c), 255, np.uint8)
    for i, img in enumerate(images):
        r, col = divmod(i, columns)
        out[r * (h + pad): r * (h + pad) + h, col * (w + pad): col * (w + pad) + w] = img
    return out
