"""Pack documents into fixed-shape batches [B, T] with per-document segment ids and positions.

Batch arrays (all numpy, static shapes):
  input_ids       int32 [B, T]   [PAD] after the last document of a row
  labels          int32 [B, T]   -100 = no LM loss (also at every document's first token when documents
                                 are masked: nothing in the row may predict it)
  segment_ids     int32 [B, T]   1..k for the k documents of a row, 0 = padding
  positions       int32 [B, T]   restart at 0 for every document (0 on padding)
  image_loss_mask int32 [B, T]   1 at placeholders of generated images (flow-matching targets)
and the image data, in one of two layouts:
  TokenImages (cached latents):  image_tokens float32 [B, T, D], the 64-d token of each placeholder
                                 position, zeros elsewhere (the model embeds it where input_ids is the
                                 placeholder id; no gather needed)
  PixelImages (VAE in the step):  images float32 [B, K, H, W, 3] in [-1, 1], zero-padded slots, and
                                 image_slots int32 [B, T]: for a placeholder, the index of its token in
                                 the row's concatenated tokens patchify(encode(images[b])) -> [K·h·w, D]
                                 (image k, raster token j -> k·h·w + j); -1 elsewhere. Per row, so the
                                 batch can be sharded along B.
With ``document_masking=False`` the row is one causal stream as in the official trainer (segment id 1
for every document, positions continue, first-token labels kept) for comparisons (ARCHITECTURE).

Packing is first-fit over B open rows; when a document fits in none, the B rows are emitted as one
batch and the document opens the next. The iterator state is the parent's state just before the first
document of the batch being filled, so restoring replays exactly the batches an uninterrupted run
yields. Each batch carries ``stats``: documents/tokens packed and skip counts since the previous batch.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import grain
import numpy as np

from nextstep_jax.data.prepare import Document
from nextstep_jax.data.samples import SKIP_REASONS, Skipped
from nextstep_jax.data.sequence import IGNORE_INDEX

STAT_KEYS = ("documents", "tokens", "truncated") + tuple(f"skipped/{r}" for r in SKIP_REASONS)


@dataclasses.dataclass(frozen=True)
class TokenImages:
    token_dim: int
    max_images: int | None = None  # images per row (None: as many as fit)


@dataclasses.dataclass(frozen=True)
class PixelImages:
    max_images: int
    height: int
    width: int
    pixels_per_token: int = 16

    @property
    def tokens_per_image(self) -> int:
        return (self.height // self.pixels_per_token) * (self.width // self.pixels_per_token)


@dataclasses.dataclass(frozen=True)
class PackingOptions:
    batch_size: int
    seq_len: int
    pad_id: int
    placeholder_id: int
    images: TokenImages | PixelImages
    document_masking: bool = True


class PackedBatches(grain.IterDataset):
    def __init__(self, parent: grain.IterDataset, options: PackingOptions):
        super().__init__(parent)
        self._options = options

    def __iter__(self) -> "PackedBatchIterator":
        return PackedBatchIterator(self._parent.__iter__(), self._options)


class PackedBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, options: PackingOptions):
        super().__init__(parent)
        self._opts = options
        self._carry: Document | None = None
        self._carry_state: dict | None = None

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._carry_state if self._carry is not None else self._parent.get_state()}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._carry = self._carry_state = None

    def __next__(self) -> dict[str, Any]:
        opts = self._opts
        rows: list[list[Document]] = [[] for _ in range(opts.batch_size)]
        used = [0] * opts.batch_size
        stats = dict.fromkeys(STAT_KEYS, 0)
        pending, pending_state = self._carry, self._carry_state
        self._carry = self._carry_state = None
        while True:
            if pending is None:
                pending_state = self._parent.get_state()
                try:
                    element = next(self._parent)
                except StopIteration:
                    if not any(rows):
                        raise
                    break
                if isinstance(element, Skipped):
                    stats[f"skipped/{element.reason}"] += 1
                    continue
                pending = element
            if not self._place(pending, rows, used):
                self._carry, self._carry_state = pending, pending_state
                break
            stats["documents"] += 1
            stats["tokens"] += len(pending)
            stats["truncated"] += int(pending.truncated)
            pending = None
        batch = self._assemble(rows)
        batch["stats"] = stats
        return batch

    def _place(self, doc: Document, rows: list[list[Document]], used: list[int]) -> bool:
        opts = self._opts
        if len(doc) > opts.seq_len:
            raise ValueError(f"document {doc.key!r} of {len(doc)} tokens exceeds seq_len {opts.seq_len}; "
                             "prepare must skip or truncate it")
        for b, row in enumerate(rows):
            if used[b] + len(doc) > opts.seq_len:
                continue
            if opts.images.max_images is not None:
                if sum(len(d.images) for d in row) + len(doc.images) > opts.images.max_images:
                    continue
            row.append(doc)
            used[b] += len(doc)
            return True
        return False

    def _assemble(self, rows: list[list[Document]]) -> dict[str, np.ndarray]:
        opts = self._opts
        shape = (opts.batch_size, opts.seq_len)
        input_ids = np.full(shape, opts.pad_id, np.int32)
        labels = np.full(shape, IGNORE_INDEX, np.int32)
        segment_ids = np.zeros(shape, np.int32)
        positions = np.zeros(shape, np.int32)
        image_loss = np.zeros(shape, np.int32)
        layout = opts.images
        if isinstance(layout, TokenImages):
            image_tokens = np.zeros(shape + (layout.token_dim,), np.float32)
        else:
            pixels = np.zeros((opts.batch_size, layout.max_images, layout.height, layout.width, 3), np.float32)
            image_slots = np.full(shape, -1, np.int32)
        for b, row in enumerate(rows):
            start, image_index = 0, 0
            for segment, doc in enumerate(row, start=1):
                n = len(doc)
                span = slice(start, start + n)
                input_ids[b, span] = doc.input_ids
                labels[b, span] = doc.labels
                image_loss[b, span] = doc.image_loss
                if opts.document_masking:
                    labels[b, start] = IGNORE_INDEX
                    segment_ids[b, span] = segment
                    positions[b, span] = np.arange(n)
                else:
                    segment_ids[b, span] = 1
                    positions[b, span] = np.arange(start, start + n)
                placeholders = start + np.flatnonzero(doc.input_ids == opts.placeholder_id)
                if isinstance(layout, TokenImages):
                    if doc.images:
                        image_tokens[b, placeholders] = np.concatenate(doc.images, axis=0)
                else:
                    per_image = layout.tokens_per_image
                    for k, image in enumerate(doc.images, start=image_index):
                        pixels[b, k] = image
                    first_slot = image_index * per_image
                    image_slots[b, placeholders] = first_slot + np.arange(len(placeholders))
                    image_index += len(doc.images)
                start += n
        batch = {"input_ids": input_ids, "labels": labels, "segment_ids": segment_ids, "positions": positions,
                 "image_loss_mask": image_loss}
        if isinstance(layout, TokenImages):
            batch["image_tokens"] = image_tokens
        else:
            batch["images"] = pixels
            batch["image_slots"] = image_slots
        return batch
