"""Sample -> Document: structure checks, caption dropout, image decode/bucket/normalise, token layout.

A Document carries its token layout and the data of each of its images, in placeholder order:
pixels float32 [H, W, 3] in [-1, 1] (``image_input="pixels"``; the VAE runs in the train step) or image
tokens float32 [h·w, C·p·p] (``image_input="latents"``, patchified from cached VAE latents). Unusable
samples become ``Skipped(reason)`` so that packing can count them; configuration mistakes (pixel
samples in a latent pipeline or vice versa, wrong latent channels) raise instead.

Caption dropout follows the official training recipe: a dropped t2i sample is laid out
image first, caption after, so the image is generated unconditionally (at the document start) and the
caption becomes a captioning target. Unlike the official code the decision is drawn per element and
epoch, not fixed per sample index. Edit samples: with ``edit_dropout`` the instruction (2/3)
or the source images (1/3) are dropped, the effective mix of the official {drop_text, drop_image,
drop_image_text == drop_text}.
"""

from __future__ import annotations

import dataclasses

import grain
import numpy as np

from nextstep_jax.data import images as image_ops
from nextstep_jax.data.samples import BadSample, LatentImage, Sample, Skipped, check_structure
from nextstep_jax.data.sequence import ImagePart, TokenLayout, layout_document
from nextstep_jax.latents import patchify

IMAGE_INPUTS = ("pixels", "latents")


@dataclasses.dataclass(frozen=True)
class PrepareOptions:
    image_input: str
    grids: tuple[tuple[int, int], ...]  # allowed token grids (pixels); latents keep their cached grid
    seq_len: int
    caption_dropout: float = 0.3
    edit_dropout: float = 0.2
    max_images: int | None = None  # images one document may hold (pixel batches have fixed slots)
    max_pixels: int = image_ops.DEFAULT_MAX_PIXELS
    patch_size: int = 2
    latent_channels: int = 16

    def __post_init__(self):
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"image_input must be one of {IMAGE_INPUTS}, got {self.image_input!r}")
        for name in ("caption_dropout", "edit_dropout"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1]")


@dataclasses.dataclass(frozen=True, eq=False)
class Document:
    key: str
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n]
    image_loss: np.ndarray  # int32 [n]
    images: tuple[np.ndarray, ...]
    truncated: bool = False

    def __len__(self) -> int:
        return len(self.input_ids)


class PrepareDocument(grain.transforms.RandomMap):
    def __init__(self, tokenizer, options: PrepareOptions):
        self.tokenizer = tokenizer
        self.options = options

    def random_map(self, element: Sample | Skipped, rng: np.random.Generator) -> Document | Skipped:
        if isinstance(element, Skipped):
            return element
        try:
            return self._prepare(element, rng)
        except BadSample as e:
            return Skipped(e.reason, element.key)

    def _prepare(self, sample: Sample, rng: np.random.Generator) -> Document:
        check_structure(sample)
        segments = self._apply_dropout(sample, rng)
        opts = self.options
        image_count = sum(not isinstance(s, str) for s in segments)
        if opts.max_images is not None and image_count > opts.max_images:
            raise BadSample("too_many_images", f"{image_count} > {opts.max_images}")
        last_image = max((i for i, s in enumerate(segments) if not isinstance(s, str)), default=-1)
        parts, arrays = [], []
        for i, seg in enumerate(segments):
            if isinstance(seg, str):
                parts.append(seg)
                continue
            array, grid = self._image(seg)
            generated = sample.kind != "edit" or i == last_image
            parts.append(ImagePart(grid, generated))
            arrays.append(array)
        layout = layout_document(parts, self.tokenizer)
        truncated = False
        if len(layout.input_ids) > opts.seq_len:
            if arrays:
                raise BadSample("too_long", f"{len(layout.input_ids)} tokens > {opts.seq_len}")
            n = opts.seq_len
            layout = TokenLayout(layout.input_ids[:n], layout.labels[:n], layout.image_loss[:n])
            truncated = True
        return Document(sample.key, layout.input_ids, layout.labels, layout.image_loss, tuple(arrays), truncated)

    def _apply_dropout(self, sample: Sample, rng: np.random.Generator) -> tuple:
        opts = self.options
        texts = tuple(t for t in sample.texts if t.strip())
        if sample.kind == "t2i":
            if rng.random() < opts.caption_dropout:
                return sample.images + texts
            return texts + sample.images
        if sample.kind == "edit" and rng.random() < opts.edit_dropout:
            if rng.random() < 2 / 3:
                return sample.images
            last = max(i for i, s in enumerate(sample.segments) if not isinstance(s, str))
            return tuple(s for i, s in enumerate(sample.segments) if isinstance(s, str) or i == last)
        return sample.segments

    def _image(self, image) -> tuple[np.ndarray, tuple[int, int]]:
        opts = self.options
        if opts.image_input == "latents":
            if not isinstance(image, LatentImage):
                raise ValueError("pipeline expects latents but a sample has pixels; run "
                                 "`python -m nextstep_jax.encode_latents` or use image_input='pixels'")
            h, w, c = image.latent.shape
            if c != opts.latent_channels:
                raise ValueError(f"cached latent has {c} channels, config says {opts.latent_channels}")
            p = opts.patch_size
            tokens = patchify(image.latent.astype(np.float32)[None], p)[0]
            return tokens, (h // p, w // p)
        if isinstance(image, LatentImage):
            raise ValueError("pipeline expects pixels but a sample has latents; use image_input='latents'")
        return image_ops.bucketed_pixels(image, opts.grids, opts.max_pixels)
