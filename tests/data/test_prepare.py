import numpy as np
import pytest

from nextstep_jax.latents import patchify
from nextstep_jax.data.images import normalize
from nextstep_jax.data.prepare import Document, PrepareDocument, PrepareOptions
from nextstep_jax.data.samples import EncodedImage, LatentImage, PixelImage, Sample, Skipped
from nextstep_jax.data.shapes import ShapesConfig, generate


def _prepare(tokenizer, sample, seed=0, **options):
    defaults = dict(image_input="pixels", grids=((4, 4),), seq_len=256, caption_dropout=0.0, edit_dropout=0.0)
    return PrepareDocument(tokenizer, PrepareOptions(**(defaults | options))).random_map(
        sample, np.random.default_rng(seed))


def _shapes_sample(index=0, size=64):
    s = generate(ShapesConfig(size=size), index)
    return Sample(f"s{index}", "t2i", (s.caption, PixelImage(s.image))), s


def _starts_with_image(doc: Document, tokenizer) -> bool:
    return doc.input_ids[0] == tokenizer.special.image_area


def test_t2i_pixels_and_layout(tokenizer):
    sample, ref = _shapes_sample()
    doc = _prepare(tokenizer, sample)
    assert not _starts_with_image(doc, tokenizer)
    assert tokenizer.decode(doc.input_ids).startswith(ref.caption + "<|image_area|>4*4<|begin_of_image|>")
    (pixels,) = doc.images
    np.testing.assert_array_equal(pixels, normalize(ref.image))
    assert doc.image_loss.sum() == 16


def test_caption_dropout_moves_the_image_first(tokenizer):
    sample, ref = _shapes_sample()
    doc = _prepare(tokenizer, sample, caption_dropout=1.0)
    assert _starts_with_image(doc, tokenizer)
    assert tokenizer.decode(doc.input_ids).endswith("<|end_of_image|>" + ref.caption + "<|endoftext|>")
    dropped = [_starts_with_image(_prepare(tokenizer, sample, seed=i, caption_dropout=0.3), tokenizer)
               for i in range(1000)]
    assert 0.26 < np.mean(dropped) < 0.34


def test_edit_dropout_variants(tokenizer, images):
    src = tgt = EncodedImage(images.png(images.gradient(64, 64)))  # the same object twice on purpose
    sample = Sample("e", "edit", (src, "make it blue", tgt))
    kept = _prepare(tokenizer, sample)
    assert len(kept.images) == 2 and kept.image_loss.sum() == 16  # only the target is generated
    variants = []
    for seed in range(300):
        doc = _prepare(tokenizer, sample, seed=seed, edit_dropout=1.0)
        has_text = "make it blue" in tokenizer.decode(doc.input_ids)
        variants.append((len(doc.images), has_text))
        assert doc.image_loss.sum() == 16
    counts = {v: variants.count(v) for v in set(variants)}
    assert set(counts) == {(2, False), (1, True)}  # drop the instruction, or drop the source image
    assert 0.58 < counts[(2, False)] / 300 < 0.75


def test_length_policy(tokenizer):
    sample, _ = _shapes_sample()
    assert _prepare(tokenizer, sample, seq_len=20) == Skipped("too_long", "s0")
    text = Sample("t", "text", ("word " * 200,))
    doc = _prepare(tokenizer, text, seq_len=50)
    assert len(doc) == 50 and doc.truncated
    assert doc.input_ids.tolist() == tokenizer.encode("word " * 200)[:50]


def test_bad_samples_become_skips(tokenizer, images):
    good = EncodedImage(images.png())
    cases = {
        "missing_caption": Sample("a", "t2i", ("   ", good)),
        "bad_structure": Sample("b", "t2i", ("two images", good, good)),
        "decode_error": Sample("c", "t2i", ("x", EncodedImage(images.truncated_jpeg()))),
        "empty_file": Sample("d", "t2i", ("x", EncodedImage(b""))),
        "decompression_bomb": Sample("e", "t2i", ("x", EncodedImage(images.bomb_png(50000, 50000)))),
        "unsupported_mode": Sample("f", "t2i", ("x", EncodedImage(images.png16()))),
        "too_many_images": Sample("g", "interleave", ("x", good, good, good)),
        "empty_text": Sample("h", "text", ("",)),
    }
    for reason, sample in cases.items():
        assert _prepare(tokenizer, sample, max_images=2) == Skipped(reason, sample.key)
    assert _prepare(tokenizer, Skipped("bad_record", "k")) == Skipped("bad_record", "k")


def test_latents_become_patchified_tokens(tokenizer):
    latent = np.random.default_rng(0).standard_normal((4, 6, 16)).astype(np.float16)
    doc = _prepare(tokenizer, Sample("l", "t2i", ("c", LatentImage(latent))), image_input="latents")
    assert "<|image_area|>2*3<|begin_of_image|>" in tokenizer.decode(doc.input_ids)
    np.testing.assert_array_equal(doc.images[0], patchify(latent.astype(np.float32)[None], 2)[0])


def test_wrong_image_input_is_a_configuration_error(tokenizer, images):
    with pytest.raises(ValueError, match="encode_latents"):
        _prepare(tokenizer, Sample("p", "t2i", ("c", EncodedImage(images.png()))), image_input="latents")
    latent = LatentImage(np.zeros((4, 4, 8), np.float32))
    with pytest.raises(ValueError, match="channels"):
        _prepare(tokenizer, Sample("l", "t2i", ("c", latent)), image_input="latents")
    with pytest.raises(ValueError, match="expects pixels"):
        _prepare(tokenizer, Sample("l", "t2i", ("c", latent)))


def test_interleaved_document_generates_every_image(tokenizer, images):
    img = EncodedImage(images.png(images.gradient(64, 64)))
    doc = _prepare(tokenizer, Sample("i", "interleave", ("intro", img, "middle", img, "end")))
    assert len(doc.images) == 2 and doc.image_loss.sum() == 32
    block = "<|image_area|>4*4<|begin_of_image|>" + "<|image_placeholder|>" * 16 + "<|end_of_image|>"
    assert tokenizer.decode(doc.input_ids) == f"intro{block}middle{block}end<|endoftext|>"
