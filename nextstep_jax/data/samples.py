"""In-memory sample types shared by the builder, the record format and the pipeline.

A sample is an ordered list of segments: text strings and images, in reading order. Its ``kind`` decides
how it becomes a training sequence (sequence.py): ``t2i`` (caption + one image), ``edit`` (source
image(s), instruction, target image; only the last image is generated), ``interleave`` (text and images,
every image generated) and ``text`` (no image).
"""

from __future__ import annotations

import dataclasses
from typing import Union

import numpy as np

KINDS = ("t2i", "edit", "interleave", "text")

# Every reason a sample can be dropped; the pipeline reports a counter for each (static metric keys).
SKIP_REASONS = (
    "empty_file",  # zero-byte image
    "decode_error",  # truncated or corrupt image bytes
    "unsupported_format",  # a container we do not decode (e.g. PSD, ICO)
    "decompression_bomb",  # declared dimensions above the pixel limit
    "unsupported_mode",  # e.g. 16-bit or float images
    "missing_file",  # an input referenced a file that does not exist
    "missing_caption",  # t2i/edit sample without text
    "empty_text",  # text sample without text
    "bad_structure",  # segments do not fit the kind (e.g. t2i with two images)
    "bad_record",  # record bytes that do not parse
    "special_token_in_text",  # text that tokenises into structural special tokens
    "too_long",  # an image-bearing document longer than the sequence
    "too_many_images",  # more images than a packed row can carry (pixel batches)
)


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """Compressed image bytes as found in the input; height/width after EXIF rotation (0 = unknown)."""

    data: bytes
    height: int = 0
    width: int = 0


@dataclasses.dataclass(frozen=True, eq=False)
class PixelImage:
    """Decoded RGB pixels, uint8 [H, W, 3]."""

    pixels: np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class LatentImage:
    """VAE latent in model space (after the VAE's own normalisation), [H/8, W/8, C]."""

    latent: np.ndarray


Image = Union[EncodedImage, PixelImage, LatentImage]
Segment = Union[str, EncodedImage, PixelImage, LatentImage]


@dataclasses.dataclass(frozen=True)
class Sample:
    key: str
    kind: str
    segments: tuple[Segment, ...]

    @property
    def images(self) -> tuple[Image, ...]:
        return tuple(s for s in self.segments if not isinstance(s, str))

    @property
    def texts(self) -> tuple[str, ...]:
        return tuple(s for s in self.segments if isinstance(s, str))


@dataclasses.dataclass(frozen=True)
class Skipped:
    """Placeholder for a sample that was dropped; travels down the pipeline so it can be counted."""

    reason: str
    key: str = ""


class BadSample(Exception):
    """Raised for a sample that cannot be used; ``reason`` is one of SKIP_REASONS."""

    def __init__(self, reason: str, detail: str = ""):
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


def check_structure(sample: Sample) -> None:
    """Raise BadSample unless the segments fit the sample's kind."""
    if sample.kind not in KINDS:
        raise BadSample("bad_structure", f"unknown kind {sample.kind!r}")
    n_images = len(sample.images)
    has_text = any(t.strip() for t in sample.texts)
    if sample.kind == "text":
        if n_images:
            raise BadSample("bad_structure", "text sample with images")
        if not has_text:
            raise BadSample("empty_text")
        return
    if sample.kind == "t2i" and n_images != 1:
        raise BadSample("bad_structure", f"t2i sample with {n_images} images")
    if sample.kind == "edit" and n_images < 2:
        raise BadSample("bad_structure", f"edit sample with {n_images} images")
    if sample.kind == "interleave" and n_images < 1:
        raise BadSample("bad_structure", "interleave sample without images")
    if sample.kind in ("t2i", "edit") and not has_text:
        raise BadSample("missing_caption")
