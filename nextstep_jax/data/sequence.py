"""Token layout of one document (docs/model.md, "Sequence format").

A document is a list of parts in reading order: text, or an image given by its token grid (h, w) and
whether it is generated (gets flow-matching loss). Each image becomes the block
``<|image_area|> "h*w" <|begin_of_image|> <|image_placeholder|>×(h·w) <|end_of_image|>`` and the
document ends with ``<|endoftext|>``.

Labels are aligned with ``input_ids`` (the model shifts: the hidden state at i predicts labels[i+1]) and
are -100 where there is no LM loss: at <|begin_of_image|>, at every placeholder (those positions are
predicted by flow matching, or are context), and at an EOS that directly follows <|end_of_image|>.
Everything else is an LM target: text, the area prefix, <|end_of_image|>, the final EOS after text.
This matches the official labels (which also leave the last placeholder's label set, a value the model
never reads). ``image_loss`` is 1 at the placeholders of generated images.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

from nextstep_jax.data.samples import BadSample

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class ImagePart:
    grid: tuple[int, int]  # (h, w) in tokens
    generated: bool


@dataclasses.dataclass(frozen=True)
class TokenLayout:
    input_ids: np.ndarray  # int32 [n]
    labels: np.ndarray  # int32 [n]
    image_loss: np.ndarray  # int32 [n]


def area_prefix_ids(grid: tuple[int, int], tokenizer) -> list[int]:
    """Ids of "<|image_area|>{h}*{w}"."""
    h, w = grid
    return [tokenizer.special.image_area] + tokenizer.encode(f"{h}*{w}")


def text_ids(text: str, tokenizer) -> list[int]:
    ids = tokenizer.encode(text)
    if tokenizer.special.structural().intersection(ids):
        raise BadSample("special_token_in_text", repr(text[:80]))
    return ids


def layout_document(parts: Sequence[str | ImagePart], tokenizer) -> TokenLayout:
    sp = tokenizer.special
    ids: list[int] = []
    labels: list[int] = []
    image_loss: list[int] = []
    for part in parts:
        if isinstance(part, str):
            t = text_ids(part, tokenizer)
            ids += t
            labels += t
            image_loss += [0] * len(t)
            continue
        prefix = area_prefix_ids(part.grid, tokenizer)
        n = part.grid[0] * part.grid[1]
        ids += prefix + [sp.boi] + [sp.placeholder] * n + [sp.eoi]
        labels += prefix + [IGNORE_INDEX] * (1 + n) + [sp.eoi]
        image_loss += [0] * (len(prefix) + 1) + [int(part.generated)] * n + [0]
    labels.append(IGNORE_INDEX if ids and ids[-1] == sp.eoi else sp.eos)
    ids.append(sp.eos)
    image_loss.append(0)
    return TokenLayout(np.asarray(ids, np.int32), np.asarray(labels, np.int32), np.asarray(image_loss, np.int32))
