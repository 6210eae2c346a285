"""A packed batch from the data pipeline, run through the golden model, gives every document exactly the
logits and flow-matching conditions it gets alone (segment-id masking + positions restarting per document)."""

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.data.packing import PackedBatches, PackingOptions, TokenImages
from nextstep_jax.data.prepare import Document
from nextstep_jax.data.sequence import ImagePart, layout_document
from nextstep_jax.models.nextstep import NextStep, token_dim
from numerics import assert_close_rel


def _document(tokenizer, key, parts, dim, rng) -> Document:
    layout = layout_document(parts, tokenizer)
    images = tuple(rng.standard_normal((p.grid[0] * p.grid[1], dim)).astype(np.float32)
                   for p in parts if isinstance(p, ImagePart))
    return Document(key, layout.input_ids, layout.labels, layout.image_loss, images)


def test_packed_documents_match_documents_alone(golden_model, tokenizer):
    cfg, variables = golden_model()
    model = NextStep(cfg)
    dim = token_dim(cfg)
    rng = np.random.default_rng(0)
    docs = [
        _document(tokenizer, "t2i", ["a red circle", ImagePart((2, 3), True)], dim, rng),
        _document(tokenizer, "text", ["plain text only, no image at all"], dim, rng),
        _document(tokenizer, "edit", [ImagePart((2, 2), False), "make it blue", ImagePart((2, 2), True)], dim, rng),
    ]
    sp = tokenizer.special
    assert sp.placeholder == cfg.image_placeholder_id
    seq_len = sum(len(d.input_ids) for d in docs) + 5
    opts = PackingOptions(batch_size=1, seq_len=seq_len, pad_id=sp.pad, placeholder_id=sp.placeholder,
                          images=TokenImages(dim))
    (batch,) = list(PackedBatches(grain.MapDataset.source(docs).to_iter_dataset(), opts))
    assert batch["stats"]["documents"] == len(docs)

    forward = jax.jit(lambda ids, tok, seg, pos: model.apply(variables, ids, tok, segment_ids=seg, positions=pos))
    with jax.default_matmul_precision("highest"):
        packed = forward(*(jnp.asarray(batch[k]) for k in ("input_ids", "image_tokens", "segment_ids", "positions")))
        segments = batch["segment_ids"][0]
        for i, doc in enumerate(docs, start=1):
            where = np.flatnonzero(segments == i)
            ids = jnp.asarray(batch["input_ids"][:, where])
            alone = model.apply(variables, ids, jnp.asarray(batch["image_tokens"][:, where]))
            assert batch["positions"][0, where].tolist() == list(range(len(where)))
            assert_close_rel(model.apply(variables, packed[:, where], method=NextStep.logits),
                             model.apply(variables, alone, method=NextStep.logits), 1e-5, f"{doc.key} logits")
            assert_close_rel(model.apply(variables, packed[:, where], method=NextStep.condition),
                             model.apply(variables, alone, method=NextStep.condition), 1e-5, f"{doc.key} FM condition")
