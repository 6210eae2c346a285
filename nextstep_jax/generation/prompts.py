"""Prompt rows exactly as the official pipeline builds them (``pipeline_nextstep.py``).

Official behaviour reproduced (``NextStepPipeline._check_input`` / ``_build_captions`` / ``_add_prefix_ids``):
each caption's single ``<image>`` becomes the image block of its input image; captions are repeated
``num_images_per_caption`` times (caption-major); the positive prompt is appended with one space; CFG rows
follow: ``[negative]×n`` (text CFG) or ``[image block of the first image + negative]×n ++ [negative]×n``
(text + image CFG, the input images fed twice); rows are left padded to the longest; the generation prefix
``<|image_area|>h*w<|begin_of_image|>`` is appended to every row. Special-token strings inside a prompt are
tokenised as their ids, as the HF tokenizer does.

Decided differently from the official code (docs/model.md): image guidance without text guidance is rejected
(``settings.cfg_mult_for``); BOS is an explicit flag, never a silent drop of the first prefix token; sizes
must be multiples of the down factor; a literal ``<image>`` without an input image and structural
special tokens written in a prompt (which would desynchronise placeholders and images) are errors.
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import numpy as np

from nextstep_jax.data.sequence import area_prefix_ids
from nextstep_jax.data.tokenizer import load_tokenizer
from nextstep_jax.generation.settings import SamplingSettings
from nextstep_jax.models.vae import downsample_factor

IMAGE_TAG = "<image>"
_SPECIAL_MARKUP = re.compile(r"<\|[^<>|\s]*\|>")


class PromptError(ValueError):
    """A prompt, setting or input that the official pipeline cannot turn into a valid sequence."""


class PromptTokenizer:
    """Text -> ids as the official ``tokenizer(text)``: special-token strings become their ids and the text
    between them goes through the plain tokenizer (``data.tokenizer``, which keeps such strings as text)."""

    def __init__(self, path: str | Path):
        self.base = load_tokenizer(path)
        self.special = self.base.special
        self.added = self.base.added_tokens()
        self.structural = {s: i for s, i in self.added.items() if i in self.special.structural()}
        # Longest first so that no special string matches inside a longer one.
        names = sorted(self.added, key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, names)) + ")") if names else None

    def token_id(self, name: str) -> int:
        if name not in self.added:
            raise PromptError(f"the tokenizer has no special token {name!r}")
        return self.added[name]

    def encode(self, text: str) -> list[int]:
        """Ids of user text; non-structural special tokens (e.g. ``<|begin_of_thinking|>``) are allowed."""
        ids: list[int] = []
        for part in self._split.split(text) if self._split else [text]:
            if not part:
                continue
            if part in self.added:
                if part in self.structural:
                    raise PromptError(f"prompt contains the structural token {part!r}; image blocks come only "
                                      f"from {IMAGE_TAG} with an input image")
                ids.append(self.added[part])
                continue
            unknown = _SPECIAL_MARKUP.search(part)
            if unknown:
                raise PromptError(f"unknown special token {unknown.group(0)!r} in prompt {text[:80]!r}; "
                                  f"this tokenizer knows {sorted(self.added)}")
            ids += self.base.encode(part)
        return ids

    def decode(self, ids) -> str:
        return self.base.decode([int(i) for i in ids])

    def area_ids(self, grid: tuple[int, int]) -> list[int]:
        """``<|image_area|>h*w`` (the size string is plain text, height first)."""
        return area_prefix_ids(grid, self.base)

    def image_block_ids(self, grid: tuple[int, int]) -> list[int]:
        sp = self.special
        return self.area_ids(grid) + [sp.boi] + [sp.placeholder] * (grid[0] * grid[1]) + [sp.eoi]

    def check_model_ids(self, model_cfg) -> None:
        """The model's boi/eoi/placeholder ids must be this tokenizer's."""
        sp = self.special
        for name, ours, theirs in (("<|begin_of_image|>", sp.boi, model_cfg.boi),
                                   ("<|end_of_image|>", sp.eoi, model_cfg.eoi),
                                   ("<|image_placeholder|>", sp.placeholder, model_cfg.image_placeholder_id)):
            if ours != theirs:
                raise PromptError(f"tokenizer id of {name} is {ours} but the model config says {theirs}: "
                                  "tokenizer and model do not belong together")


@dataclasses.dataclass(frozen=True)
class PromptRows:
    """The batch the generation function consumes.

    ``input_ids``/``attention_mask`` [rows, T] int32, rows = ``cfg_mult`` × ``num_samples``, left padded.
    ``image_rows``: for each input image fed (placeholder-fill order = row order), the index of its
    caption's image; ``image_copy``: 0 for a conditional row, 1 for its image-CFG copy. ``pad_offset``: left
    pads added beyond the longest row to reach the length bucket (the generator subtracts it from RoPE
    positions, so bucketing does not change results). ``open_rows``: leading rows that end *without* the
    generation prefix because text is decoded first (``prefix`` is then forced after the text).
    """

    input_ids: np.ndarray
    attention_mask: np.ndarray
    cfg_mult: int
    num_samples: int
    images_per_caption: int
    grid: tuple[int, int]
    prefix: tuple[int, ...]
    image_rows: tuple[int, ...] = ()
    image_copy: tuple[int, ...] = ()
    pad_offset: int = 0
    open_rows: int = 0


def token_grid(hw: tuple[int, int], down_factor: int, what: str = "image size") -> tuple[int, int]:
    h, w = (int(v) for v in hw)
    if h <= 0 or w <= 0 or h % down_factor or w % down_factor:
        raise PromptError(f"{what} {h}x{w} must be positive multiples of {down_factor} (VAE stride × patch size)")
    return h // down_factor, w // down_factor


def _expand_images(tok: PromptTokenizer, caption: str, image_grid: tuple[int, int] | None) -> list[int]:
    count = caption.count(IMAGE_TAG)
    if image_grid is None:
        if count:
            raise PromptError(f"prompt {caption[:80]!r} contains {IMAGE_TAG} but no input image was given")
        return tok.encode(caption)
    if count != 1:
        raise PromptError(f"prompt {caption[:80]!r} has {count} {IMAGE_TAG} tags; an input image needs exactly one")
    before, after = caption.split(IMAGE_TAG)
    return tok.encode(before) + tok.image_block_ids(image_grid) + tok.encode(after)


def build_prompt_rows(tok: PromptTokenizer, captions: list[str], settings: SamplingSettings, *, down_factor: int,
                      image_sizes: list[tuple[int, int]] | None = None, num_images_per_caption: int = 1,
                      bos_id: int | None = None) -> PromptRows:
    """Rows for ``captions`` (one input image size (H, W) per caption in ``image_sizes`` when editing).

    From ``settings``: the output size ``hw``, the guidance layout, positive and negative prompts,
    ``prepend_bos`` (``bos_id`` before every caption; GH2 style, off for NextStep-1), ``length_bucket`` (T
    rounded up to a multiple with extra left padding) and ``text_tokens`` (> 0: the conditional rows are
    left without the generation prefix, text is decoded there before the image).
    """
    if not captions:
        raise PromptError("no prompt given")
    if num_images_per_caption < 1:
        raise PromptError(f"num_images_per_caption must be >= 1, got {num_images_per_caption}")
    if settings.prepend_bos and bos_id is None:
        raise PromptError("prepend_bos needs a bos_id")
    cfg_mult = settings.cfg_mult
    grid = token_grid(settings.hw, down_factor)
    if image_sizes is not None and len(image_sizes) != len(captions):
        raise PromptError(f"{len(image_sizes)} input images for {len(captions)} prompts: give one per prompt")
    if image_sizes is None and cfg_mult == 3:
        raise PromptError(f"image_guidance_scale={settings.image_guidance_scale} (image CFG) needs an input image")
    image_grids = None if image_sizes is None else [token_grid(s, down_factor, "input image size")
                                                    for s in image_sizes]
    if cfg_mult == 3 and len(set(image_grids)) > 1:
        raise PromptError("image CFG builds every unconditional row with the first image's block: all input "
                          f"images must have the same size, got {sorted(set(image_sizes))}")

    positive = f" {settings.positive_prompt}" if settings.positive_prompt else ""
    bos = [bos_id] if settings.prepend_bos else []
    rows = []
    for i, caption in enumerate(captions):
        # The positive prompt joins the caption string before tokenisation, as f"{caption} {positive}".
        ids = _expand_images(tok, caption + positive, None if image_grids is None else image_grids[i])
        rows += [bos + ids] * num_images_per_caption
    n = len(rows)
    negative = tok.encode(settings.negative_prompt or "")
    if cfg_mult == 3:
        rows += [bos + tok.image_block_ids(image_grids[0]) + negative] * n
    if cfg_mult >= 2:
        rows += [bos + negative] * n

    prefix = tok.area_ids(grid) + [tok.special.boi]
    open_rows = n if settings.text_tokens > 0 else 0
    rows = [r if i < open_rows else r + prefix for i, r in enumerate(rows)]
    longest = max(len(r) for r in rows)
    width = -(-longest // settings.length_bucket) * settings.length_bucket
    input_ids = np.full((len(rows), width), tok.special.pad, np.int32)
    attention_mask = np.zeros((len(rows), width), np.int32)
    for i, r in enumerate(rows):
        input_ids[i, width - len(r):] = r
        attention_mask[i, width - len(r):] = 1

    image_rows: tuple[int, ...] = ()
    image_copy: tuple[int, ...] = ()
    if image_grids is not None:
        per_sample = [c for c in range(len(captions)) for _ in range(num_images_per_caption)]
        copies = 2 if cfg_mult == 3 else 1
        image_rows = tuple(per_sample * copies)
        image_copy = tuple(k for k in range(copies) for _ in per_sample)
    return PromptRows(input_ids=input_ids, attention_mask=attention_mask, cfg_mult=cfg_mult, num_samples=n,
                      images_per_caption=num_images_per_caption, grid=grid, prefix=tuple(prefix),
                      image_rows=image_rows, image_copy=image_copy, pad_offset=width - longest,
                      open_rows=open_rows)


class PromptBuilder:
    """Prompt rows for one model: its tokenizer (checked against the model's special ids), its BOS id and
    the pixels per image token (VAE stride × patch size). Needs the configs only, not the weights."""

    def __init__(self, tok: PromptTokenizer, model_cfg, vae_cfg):
        tok.check_model_ids(model_cfg)
        self.tok = tok
        self.bos_id = model_cfg.bos_token_id
        self.down_factor = downsample_factor(vae_cfg) * model_cfg.latent_patch_size

    def num_image_tokens(self, settings: SamplingSettings) -> int:
        h, w = token_grid(settings.hw, self.down_factor)
        return h * w

    def rows(self, captions: list[str], settings: SamplingSettings, *,
             image_sizes: list[tuple[int, int]] | None = None, num_images_per_caption: int = 1) -> PromptRows:
        return build_prompt_rows(self.tok, captions, settings, down_factor=self.down_factor, image_sizes=image_sizes,
                                 num_images_per_caption=num_images_per_caption, bos_id=self.bos_id)
