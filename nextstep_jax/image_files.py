"""Image files for sampling: reading edit inputs, writing PNGs (with text chunks) and sidecars atomically.

Writes go to a temporary file in the destination folder and are renamed into place, so an interrupted
run never leaves a truncated file under a final name. PNG bytes depend only on pixels and text chunks
(no timestamps), so the same seed gives byte-identical files.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, PngImagePlugin

from nextstep_jax.data.images import open_image, to_rgb
from nextstep_jax.data.samples import BadSample


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


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def png_bytes(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    info = PngImagePlugin.PngInfo()
    for key, value in (text or {}).items():
        info.add_itxt(key, value)
    buf = io.BytesIO()
    Image.fromarray(np.asarray(image, np.uint8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def write_png(path: str | Path, image: np.ndarray, text: dict[str, str] | None = None) -> None:
    """uint8 [H, W, 3] -> PNG with international text chunks (UTF-8 prompts), written atomically."""
    _write_atomic(Path(path), png_bytes(image, text))


def write_json(path: str | Path, obj) -> None:
    _write_atomic(Path(path), (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


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
