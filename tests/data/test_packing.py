import grain
import numpy as np
import pytest

from nextstep_jax.data.packing import PackedBatches, PackingOptions, PixelImages, TokenImages
from nextstep_jax.data.prepare import Document
from nextstep_jax.data.samples import Skipped
from nextstep_jax.data.sequence import IGNORE_INDEX, ImagePart, layout_document

PAD, PH = 0, 9


def _text_doc(key: str, ids: list[int]) -> Document:
    ids = np.asarray(ids, np.int32)
    return Document(key, ids, ids.copy(), np.zeros_like(ids), ())


def _pack(elements, **options) -> list[dict]:
    opts = PackingOptions(pad_id=PAD, placeholder_id=PH, **options)
    return list(PackedBatches(grain.MapDataset.source(elements).to_iter_dataset(), opts))


def test_first_fit_rows_segments_positions_labels():
    lengths = [6, 5, 3, 4, 2]
    docs = [_text_doc(f"d{i}", list(range(10 * (i + 1), 10 * (i + 1) + n))) for i, n in enumerate(lengths)]
    batches = _pack(docs, batch_size=2, seq_len=10, images=TokenImages(4))
    assert len(batches) == 2
    first, second = batches
    # First fit: d0 -> row 0, d1 -> row 1, d2 -> row 0, d3 -> row 1, d4 fits nowhere -> next batch.
    assert first["input_ids"][0].tolist() == [10, 11, 12, 13, 14, 15, 30, 31, 32, PAD]
    assert first["input_ids"][1].tolist() == [20, 21, 22, 23, 24, 40, 41, 42, 43, PAD]
    assert first["segment_ids"].tolist() == [[1] * 6 + [2] * 3 + [0], [1] * 5 + [2] * 4 + [0]]
    assert first["positions"].tolist() == [[0, 1, 2, 3, 4, 5, 0, 1, 2, 0], [0, 1, 2, 3, 4, 0, 1, 2, 3, 0]]
    X = IGNORE_INDEX
    assert first["labels"][0].tolist() == [X, 11, 12, 13, 14, 15, X, 31, 32, X]
    assert second["input_ids"].tolist() == [[50, 51] + [PAD] * 8, [PAD] * 10]
    assert first["stats"]["documents"] == 4 and first["stats"]["tokens"] == 18
    assert second["stats"]["documents"] == 1
    for key in ("input_ids", "labels", "segment_ids", "positions", "image_loss_mask"):
        assert first[key].dtype == np.int32 and first[key].shape == (2, 10)


def test_official_stream_mode():
    docs = [_text_doc("a", [1, 2, 3]), _text_doc("b", [4, 5])]
    (batch,) = _pack(docs, batch_size=1, seq_len=6, images=TokenImages(4), document_masking=False)
    assert batch["segment_ids"].tolist() == [[1, 1, 1, 1, 1, 0]]
    assert batch["positions"].tolist() == [[0, 1, 2, 3, 4, 0]]
    assert batch["labels"].tolist() == [[1, 2, 3, 4, 5, IGNORE_INDEX]]


def _image_doc(tokenizer, key: str, caption: str, grids, generated, rng, token_dim=4) -> Document:
    parts = [caption] + [ImagePart(g, f) for g, f in zip(grids, generated)]
    layout = layout_document(parts, tokenizer)
    tokens = tuple(rng.standard_normal((g[0] * g[1], token_dim)).astype(np.float32) for g in grids)
    return Document(key, layout.input_ids, layout.labels, layout.image_loss, tokens)


def test_image_tokens_land_on_their_placeholders(tokenizer):
    rng = np.random.default_rng(0)
    docs = [_image_doc(tokenizer, "e", "edit", [(1, 2), (2, 1)], [False, True], rng),
            _image_doc(tokenizer, "t", "a red circle", [(2, 2)], [True], rng)]
    sp = tokenizer.special
    opts = PackingOptions(batch_size=1, seq_len=64, pad_id=sp.pad, placeholder_id=sp.placeholder,
                          images=TokenImages(4))
    (batch,) = list(PackedBatches(grain.MapDataset.source(docs).to_iter_dataset(), opts))
    ids, tokens = batch["input_ids"][0], batch["image_tokens"][0]
    placeholders = np.flatnonzero(ids == sp.placeholder)
    expected = np.concatenate([t for d in docs for t in d.images])
    np.testing.assert_array_equal(tokens[placeholders], expected)
    assert not tokens[np.setdiff1d(np.arange(64), placeholders)].any()
    # Generated images only: the edit target (2 tokens) and the t2i image (4 tokens).
    assert batch["image_loss_mask"][0, placeholders].tolist() == [0, 0, 1, 1, 1, 1, 1, 1]


def _patch_means(image: np.ndarray, p: int = 16) -> np.ndarray:
    """A stand-in encoder+patchify: one token (mean colour) per 16x16 patch, raster order."""
    h, w, c = image.shape
    return image.reshape(h // p, p, w // p, p, c).mean(axis=(1, 3)).reshape(-1, c)


def test_token_rows_hold_at_most_max_images(tokenizer):
    rng = np.random.default_rng(3)
    docs = [_image_doc(tokenizer, str(i), "a red circle", [(2, 2)], [True], rng) for i in range(5)]
    sp = tokenizer.special
    opts = PackingOptions(batch_size=1, seq_len=256, pad_id=sp.pad, placeholder_id=sp.placeholder,
                          images=TokenImages(4, max_images=2))
    batches = list(PackedBatches(grain.MapDataset.source(docs).to_iter_dataset(), opts))
    assert [b["stats"]["documents"] for b in batches] == [2, 2, 1]  # every row has room for all five
    for batch in batches:
        assert (batch["input_ids"] == sp.placeholder).sum() == 4 * batch["stats"]["documents"]


def test_pixel_slots_gather_each_documents_tokens(tokenizer):
    rng = np.random.default_rng(1)
    sp = tokenizer.special
    docs = []
    for i in range(3):
        layout = layout_document([f"caption {i}", ImagePart((1, 2), True)], tokenizer)
        pixels = rng.uniform(-1, 1, (16, 32, 3)).astype(np.float32)
        docs.append(Document(str(i), layout.input_ids, layout.labels, layout.image_loss, (pixels,)))
    opts = PackingOptions(batch_size=1, seq_len=256, pad_id=sp.pad, placeholder_id=sp.placeholder,
                          images=PixelImages(max_images=2, height=16, width=32))
    batches = list(PackedBatches(grain.MapDataset.source(docs).to_iter_dataset(), opts))
    assert [b["stats"]["documents"] for b in batches] == [2, 1]  # two image slots per row
    for batch, row_docs in zip(batches, (docs[:2], docs[2:])):
        assert batch["images"].shape == (1, 2, 16, 32, 3)
        row_tokens = np.concatenate([_patch_means(img) for img in batch["images"][0]])  # [K*h*w, 3]
        slots = batch["image_slots"][0]
        placeholders = np.flatnonzero(batch["input_ids"][0] == sp.placeholder)
        assert (slots[placeholders] >= 0).all() and (np.delete(slots, placeholders) == -1).all()
        gathered = row_tokens[slots[placeholders]]
        np.testing.assert_allclose(gathered, np.concatenate([_patch_means(d.images[0]) for d in row_docs]))


def _rope(x, pos):
    half = x.shape[-1] // 2
    angle = pos[:, None] * (10000.0 ** (-np.arange(half) / half))[None]
    x1, x2 = x[:, :half], x[:, half:]
    return np.concatenate([x1 * np.cos(angle) - x2 * np.sin(angle), x2 * np.cos(angle) + x1 * np.sin(angle)], -1)


def _attention(ids, image_tokens, pos, mask, w):
    x = np.where((ids == PH)[:, None], image_tokens @ w["img"], w["emb"][ids])
    q, k, v = _rope(x @ w["q"], pos), _rope(x @ w["k"], pos), x @ w["v"]
    scores = np.where(mask, q @ k.T / np.sqrt(q.shape[-1]), -np.inf)
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    return (probs / probs.sum(-1, keepdims=True)) @ v


def test_packed_row_attention_equals_per_document_attention():
    """float64 reference: masks from segment_ids + positions make a packed row exact per document."""
    rng = np.random.default_rng(2)
    d = 8
    w = {k: rng.standard_normal((d, d)) for k in ("q", "k", "v")}
    w["emb"], w["img"] = rng.standard_normal((16, d)), rng.standard_normal((4, d))
    docs = []
    for i, n in enumerate([7, 5, 9]):
        ids = rng.integers(1, 16, n).astype(np.int32)
        ids[2:4] = PH
        images = (rng.standard_normal((2, 4)).astype(np.float32),)
        docs.append(Document(str(i), ids, ids.copy(), np.zeros_like(ids), images))
    results = {}
    for masking in (True, False):
        (batch,) = _pack(docs, batch_size=1, seq_len=24, images=TokenImages(4), document_masking=masking)
        seg, pos = batch["segment_ids"][0], batch["positions"][0].astype(np.float64)
        ids, tokens = batch["input_ids"][0], batch["image_tokens"][0].astype(np.float64)
        valid = seg > 0
        causal = np.tril(np.ones((24, 24), bool))
        mask = (seg[:, None] == seg[None, :]) & valid[:, None] & causal
        mask |= np.eye(24, dtype=bool)  # padding queries attend to themselves (ignored)
        results[masking] = (_attention(ids, tokens, pos, mask, w), seg)
    out, seg = results[True]
    leaky, _ = results[False]
    start = 0
    for k, doc in enumerate(docs, start=1):
        n = len(doc)
        assert (seg[start:start + n] == k).all()
        doc_tokens = np.zeros((n, 4))
        doc_tokens[doc.input_ids == PH] = doc.images[0]
        alone = _attention(doc.input_ids, doc_tokens, np.arange(n, dtype=np.float64), np.tril(np.ones((n, n), bool)), w)
        np.testing.assert_allclose(out[start:start + n], alone, rtol=0, atol=1e-12)
        if k > 1:  # the official unmasked stream lets later documents see earlier ones
            assert np.abs(leaky[start:start + n] - alone).max() > 1e-3
        start += n


def _equal_batches(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(
        a[k] == b[k] if k == "stats" else np.array_equal(a[k], b[k]) for k in a)


def test_state_restore_yields_the_same_batches():
    rng = np.random.default_rng(3)
    elements = []
    for i in range(60):
        if i % 7 == 3:
            elements.append(Skipped("decode_error", str(i)))
        else:
            elements.append(_text_doc(str(i), rng.integers(1, 50, rng.integers(2, 9)).tolist()))
    opts = PackingOptions(batch_size=2, seq_len=12, pad_id=PAD, placeholder_id=PH, images=TokenImages(4))
    dataset = PackedBatches(grain.MapDataset.source(elements).to_iter_dataset(), opts)
    reference = list(dataset)
    assert sum(b["stats"]["skipped/decode_error"] for b in reference) == 9  # i = 3, 10, ..., 59
    assert sum(b["stats"]["documents"] for b in reference) == 51
    for split in (0, 1, 3, len(reference) - 1):
        it = iter(dataset)
        for _ in range(split):
            next(it)
        state = it.get_state()
        restored = iter(dataset)
        restored.set_state(state)
        rest = list(restored)
        assert len(rest) == len(reference) - split
        assert all(_equal_batches(x, y) for x, y in zip(rest, reference[split:]))


def test_oversized_document_is_a_bug_not_a_skip():
    with pytest.raises(ValueError, match="exceeds seq_len"):
        _pack([_text_doc("long", list(range(1, 20)))], batch_size=1, seq_len=8, images=TokenImages(4))
