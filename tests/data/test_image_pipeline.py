"""The VAE image pipeline: batch layout, every image of every sample (pixels match a direct decode), bad images
skipped and counted, exact resume (also in the middle of a multi-image sample), disjoint process shards,
held-out images in source order."""

import ml_collections
import numpy as np
import pytest

from nextstep_jax.data import images as image_ops
from nextstep_jax.data.image_pipeline import (ImageDataConfig, held_out_images, make_image_iterator,
                                              sample_pixels)
from nextstep_jax.data.pipeline import DatasetSpec
from nextstep_jax.data.records import RecordWriter
from nextstep_jax.data.samples import SKIP_REASONS, EncodedImage, Sample
from nextstep_jax.data.shapes import ShapesConfig, generate

SIZE = 32


def _records(tmp_path, images):
    """t2i, a 3-image edit, text only, a truncated image: 1 + 3 + 0 + 0 usable images, in this order."""
    grad = images.gradient(40, 48)
    samples = [
        Sample("t2i", "t2i", ("caption", EncodedImage(images.png(grad)))),
        Sample("edit", "edit", (EncodedImage(images.png(grad[::-1].copy())), "make it so",
                                EncodedImage(images.png(np.full((SIZE, SIZE, 3), 7, np.uint8))),
                                EncodedImage(images.png(grad[:, ::-1].copy())))),
        Sample("text", "text", ("just words",)),
        Sample("bad", "t2i", ("x", EncodedImage(images.truncated_jpeg()))),
    ]
    with RecordWriter(tmp_path / "rec") as writer:
        for s in samples:
            writer.write(s)
    return str(tmp_path / "rec"), samples


def test_every_image_once_per_epoch_and_bad_ones_counted(tmp_path, images):
    path, samples = _records(tmp_path, images)
    # Seed 1 shuffles the bad sample before the last usable image: skips after the last full batch of a finite
    # stream are not counted (no batch carries them), as in the packed pipeline.
    config = ImageDataConfig(batch_size=2, image_size=SIZE, num_epochs=1, seed=1)
    it = make_image_iterator(config, [DatasetSpec(path)])
    batches = list(it)
    assert [b["images"].shape for b in batches] == [(2, SIZE, SIZE, 3)] * 2
    assert all(b["images"].dtype == np.float32 for b in batches)
    got = sorted(map(bytes, np.concatenate([b["images"] for b in batches])))
    want = sorted(bytes(image_ops.normalize(p)) for s in samples[:2] for p in sample_pixels(s, SIZE))
    assert got == want
    metrics = it.metrics()
    assert metrics["data/images"] == 4
    assert metrics["data/skipped/decode_error"] == 1
    assert sum(metrics[f"data/skipped/{r}"] for r in SKIP_REASONS) == 1


def test_resume_is_exact_also_inside_a_sample(tmp_path, images):
    path, _ = _records(tmp_path, images)
    config = ImageDataConfig(batch_size=3, image_size=SIZE, seed=3)
    spec = [DatasetSpec(path)]
    reference = make_image_iterator(config, spec)
    expected = [next(reference)["images"] for _ in range(6)]
    for cut in range(1, 5):  # batches of 3 over samples of 1 and 3 images: several cuts fall inside the edit
        it = make_image_iterator(config, spec)
        for _ in range(cut):
            next(it)
        state = it.get_state()
        resumed = make_image_iterator(config, spec)
        resumed.set_state(state)
        for want in expected[cut:]:
            np.testing.assert_array_equal(next(resumed)["images"], want)
        assert resumed.metrics() == reference.metrics()


def test_shapes_and_process_shards():
    spec = [DatasetSpec("shapes", num_samples=12)]
    seen = []
    for index in range(2):
        config = ImageDataConfig(batch_size=2, image_size=SIZE, num_epochs=1, shard_index=index, shard_count=2)
        seen.append({bytes(x) for b in make_image_iterator(config, spec) for x in b["images"]})
    assert len(seen[0]) == len(seen[1]) == 6 and not seen[0] & seen[1]
    everything = {bytes(image_ops.normalize(generate(ShapesConfig(size=SIZE), i).image)) for i in range(12)}
    assert seen[0] | seen[1] == everything


def test_held_out_images_in_source_order(tmp_path, images):
    pixels, captions = held_out_images(DatasetSpec("shapes", split="eval"), 5, SIZE)
    for i in range(5):
        sample = generate(ShapesConfig(size=SIZE, split="eval"), i)
        np.testing.assert_array_equal(pixels[i], sample.image)
        assert captions[i] == sample.caption
    path, _ = _records(tmp_path, images)
    pixels, texts = held_out_images(DatasetSpec(path), 4, SIZE)
    assert pixels.shape == (4, SIZE, SIZE, 3) and texts == ["caption"] + ["make it so"] * 3
    with pytest.raises(ValueError, match="only 4 usable images"):
        held_out_images(DatasetSpec(path), 5, SIZE)


def test_from_config_splits_the_batch_over_processes():
    config = ml_collections.ConfigDict(dict(data=dict(
        batch_size=8, image_size=64, seed=1, num_epochs=None, num_workers=0, worker_buffer_size=2, read_threads=2,
        read_buffer_size=16, max_pixels=None)))
    view = ImageDataConfig.from_config(config, process_index=1, process_count=4)
    assert (view.batch_size, view.shard_index, view.shard_count) == (2, 1, 4)
    with pytest.raises(ValueError, match="do not split evenly over 3 processes"):
        ImageDataConfig.from_config(config, process_index=0, process_count=3)
