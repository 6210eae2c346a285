"""Image batches for image-tokenizer (VAE) training on Grain: no text, no packing.

    iterator = make_image_iterator(ImageDataConfig.from_config(config), dataset_specs(config))
    batch = next(iterator)            # {"images": float32 [B, S, S, 3] in [-1, 1]}
    iterator.metrics()                # data/images, data/skipped/<reason> (cumulative)
    images, captions = held_out_images(spec, count, image_size)       # uint8, for evaluation

The datasets are the NextStep pipeline's (``data.datasets``: record folders or the built-in "shapes"),
sharded by process, shuffled anew every epoch and mixed by weight the same way; every image of a sample
(t2i, edit sources and targets, interleaved images) is one training image, resized to cover ``S`` x ``S``
and centre-cropped (the official transform). Text-only samples contribute nothing; unusable images are
counted by reason and skipped (in a finite stream, those after the last full batch go uncounted: no
batch carries them). The iterator state is the sample stream's position before the sample whose
images are being handed out plus how many of them were, so a restore continues exactly (also through
Orbax, ``grain.checkpoint.CheckpointSave(iterator)``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import grain
import numpy as np

from nextstep_jax.data import images as image_ops
from nextstep_jax.data.images import DEFAULT_MAX_PIXELS
from nextstep_jax.data.pipeline import SHAPES, DatasetSpec
from nextstep_jax.data.samples import SKIP_REASONS, BadSample, EncodedImage, LatentImage, Sample, Skipped
from nextstep_jax.data.shapes import ShapesConfig
from nextstep_jax.data.sources import RecordSource, ShapesSource

METRIC_KEYS = ("images",) + tuple(f"skipped/{r}" for r in SKIP_REASONS)


@dataclasses.dataclass(frozen=True)
class ImageDataConfig:
    batch_size: int  # images per process per step
    image_size: int
    seed: int = 0
    num_epochs: int | None = None
    num_workers: int = 0
    worker_buffer_size: int = 2
    read_threads: int = 2
    read_buffer_size: int = 16
    max_pixels: int = DEFAULT_MAX_PIXELS
    shard_index: int = 0
    shard_count: int = 1

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"data.batch_size={self.batch_size}: must be >= 1")
        if self.image_size < 16 or self.image_size % 16:
            raise ValueError(f"data.image_size={self.image_size}: must be a positive multiple of 16")
        if not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} not in [0, {self.shard_count})")

    @classmethod
    def from_config(cls, config, *, process_index: int | None = None, process_count: int | None = None
                    ) -> "ImageDataConfig":
        """This process's view of ``config.data``: ``batch_size`` counts images over all processes."""
        if process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        data = config.data
        if data.batch_size % process_count:
            raise ValueError(f"data.batch_size={data.batch_size} images per step do not split evenly over "
                             f"{process_count} processes")
        return cls(batch_size=data.batch_size // process_count, image_size=data.image_size, seed=data.seed,
                   num_epochs=data.num_epochs, num_workers=data.num_workers,
                   worker_buffer_size=data.worker_buffer_size, read_threads=data.read_threads,
                   read_buffer_size=data.read_buffer_size,
                   max_pixels=DEFAULT_MAX_PIXELS if data.max_pixels is None else data.max_pixels,
                   shard_index=process_index, shard_count=process_count)


def open_source(spec: DatasetSpec, image_size: int):
    if spec.source == SHAPES:
        return ShapesSource(ShapesConfig(size=image_size, seed=spec.shapes_seed, split=spec.split,
                                         caption_order_grid=spec.shapes_caption_order_grid), spec.num_samples)
    return RecordSource(spec.source)


def sample_pixels(sample: Sample, size: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[np.ndarray]:
    """Every image of ``sample`` as uint8 [size, size, 3] (resize to cover, centre crop); BadSample if one
    cannot be decoded."""
    out = []
    for image in sample.images:
        if isinstance(image, LatentImage):
            raise ValueError(f"sample {sample.key!r} holds a cached latent; VAE training needs pixel records")
        rgb = image_ops.decode_rgb(image.data, max_pixels) if isinstance(image, EncodedImage) else image.pixels
        out.append(image_ops.resize_center_crop(rgb, size, size))
    return out


class _ToPixels(grain.transforms.Map):
    def __init__(self, size: int, max_pixels: int):
        self.size, self.max_pixels = size, max_pixels

    def map(self, element: Sample | Skipped) -> list[np.ndarray] | Skipped:
        if isinstance(element, Skipped):
            return element
        try:
            return sample_pixels(element, self.size, self.max_pixels)
        except BadSample as e:
            return Skipped(e.reason, element.key)


def _seed(seed: int, purpose: str, index: int) -> int:
    return int(np.random.SeedSequence([seed, int.from_bytes(purpose.encode(), "little"), index])
               .generate_state(1)[0])


class ImageBatches(grain.IterDataset):
    """Lists of uint8 images (or Skipped) -> {"images": float32 [B, S, S, 3]} plus per-batch counts."""

    def __init__(self, parent: grain.IterDataset, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size

    def __iter__(self) -> "ImageBatchIterator":
        return ImageBatchIterator(self._parent.__iter__(), self._batch_size)


class ImageBatchIterator(grain.DatasetIterator):
    def __init__(self, parent: grain.DatasetIterator, batch_size: int):
        super().__init__(parent)
        self._batch_size = batch_size
        self._pending: list[np.ndarray] = []  # images of the current sample not handed out yet
        self._pending_state: dict | None = None  # the parent's state before that sample
        self._taken = 0  # images of that sample already handed out

    def get_state(self) -> dict[str, Any]:
        if self._pending:
            return {"parent": self._pending_state, "taken": self._taken}
        return {"parent": self._parent.get_state(), "taken": 0}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._pending, self._pending_state, self._taken = [], None, 0
        if state["taken"]:
            self._pending_state = state["parent"]
            self._pending = list(next(self._parent))[state["taken"]:]
            self._taken = state["taken"]

    def __next__(self) -> dict[str, Any]:
        stats = dict.fromkeys(METRIC_KEYS, 0)
        batch: list[np.ndarray] = []
        while len(batch) < self._batch_size:
            if not self._pending:
                before = self._parent.get_state()
                element = next(self._parent)  # StopIteration ends a finite stream (a partial batch is dropped)
                if isinstance(element, Skipped):
                    stats[f"skipped/{element.reason}"] += 1
                    continue
                self._pending, self._pending_state, self._taken = list(element), before, 0
                continue
            batch.append(self._pending.pop(0))
            self._taken += 1
        stats["images"] = len(batch)
        return {"images": image_ops.normalize(np.stack(batch)), "stats": stats}


def make_image_dataset(config: ImageDataConfig, datasets: Sequence[DatasetSpec]) -> grain.IterDataset:
    if not datasets:
        raise ValueError("data.datasets is empty: name at least one dataset")
    weights = [d.weight for d in datasets]
    if min(weights) <= 0:
        raise ValueError(f"dataset weights must be > 0, got {weights}")
    to_pixels = _ToPixels(config.image_size, config.max_pixels)
    per_dataset = []
    for i, spec in enumerate(datasets):
        ds = grain.MapDataset.source(open_source(spec, config.image_size))
        if len(ds) < config.shard_count:
            raise ValueError(f"{spec.source}: {len(ds)} samples cannot be split over {config.shard_count} processes")
        ds = ds[config.shard_index::config.shard_count]
        ds = ds.shuffle(seed=_seed(config.seed, "shuffle", i)).repeat(config.num_epochs)
        per_dataset.append(ds.map(to_pixels))
    mixed = per_dataset[0] if len(per_dataset) == 1 else grain.MapDataset.mix(per_dataset, weights)
    stream = mixed.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                     prefetch_buffer_size=config.read_buffer_size))
    batches = ImageBatches(stream, config.batch_size)
    if config.num_workers > 0:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size))
    return batches


class ImageIterator(grain.DatasetIterator):
    """Yields {"images": ...}; keeps the cumulative counts (part of its state) for ``metrics()``."""

    def __init__(self, dataset: grain.IterDataset):
        super().__init__(dataset.__iter__())
        self._totals = dict.fromkeys(METRIC_KEYS, 0)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        for k, v in batch.pop("stats").items():
            self._totals[k] += int(v)
        return batch

    def metrics(self) -> dict[str, float]:
        return {f"data/{k}": float(v) for k, v in self._totals.items()}

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "totals": dict(self._totals)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._totals = {k: int(state["totals"].get(k, 0)) for k in METRIC_KEYS}


def make_image_iterator(config: ImageDataConfig, datasets: Sequence[DatasetSpec]) -> ImageIterator:
    return ImageIterator(make_image_dataset(config, datasets))


def held_out_images(spec: DatasetSpec, count: int, image_size: int,
                    max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[np.ndarray, list[str]]:
    """The first ``count`` usable images of ``spec`` in source order (uint8 [count, S, S, 3]) and the text
    of the sample each came from (its caption; "" for a sample without text)."""
    source = open_source(spec, image_size)
    images, texts = [], []
    for index in range(len(source)):
        sample = source[index]
        if isinstance(sample, Skipped):
            continue
        try:
            pixels = sample_pixels(sample, image_size, max_pixels)
        except BadSample:
            continue
        text = " ".join(t for t in sample.texts if t.strip())
        for p in pixels[:count - len(images)]:
            images.append(p)
            texts.append(text)
        if len(images) == count:
            return np.stack(images), texts
    raise ValueError(f"{spec.source}: holds only {len(images)} usable images, {count} asked for evaluation")
