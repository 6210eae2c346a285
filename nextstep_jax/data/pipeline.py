"""The training data pipeline on Grain: sources -> shard -> shuffle/repeat -> prepare -> mix -> pack.

    iterator = make_iterator(DataConfig.from_config(config), dataset_specs(config),
                             load_tokenizer(config.data.tokenizer))
    batch = next(iterator)          # dict of numpy arrays, layout in packing.py
    metrics = iterator.metrics()    # data/skipped/<reason>, data/documents, data/pad_fraction, ...
    state = iterator.get_state()    # JSON-serialisable; iterator.set_state(state) resumes exactly

Per dataset, records are sharded by process first (``shard_index::shard_count``, default the JAX process
index/count), so processes see disjoint samples whose union is the dataset; then each shard is shuffled
anew every epoch. Documents of several datasets are interleaved by weight (Grain's
deterministic ``MapDataset.mix``; the official trainer instead draws a dataset per packed row).
``num_epochs=None`` repeats forever (training); ``num_epochs=1`` is one pass (evaluation, counting).
``num_workers > 0`` runs everything up to the packed batch in Grain worker processes; the program must
then parse absl flags (``absl.app.run`` or ``flags.FLAGS.mark_as_parsed()``) and guard
``if __name__ == "__main__"``. The state restores exactly for an unchanged ``num_workers``. Otherwise a thread
packs ``prefetch_batches`` batches ahead while the step runs.

The iterator is a ``grain.DatasetIterator``, so Orbax saves it with
``grain.checkpoint.CheckpointSave(iterator)`` / ``CheckpointRestore(iterator)``; the state includes the
cumulative data metrics.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import grain
import numpy as np

from nextstep_jax.configs import data_config, model_config
from nextstep_jax.data.buckets import PIXELS_PER_TOKEN, bucket_grids
from nextstep_jax.data.images import DEFAULT_MAX_PIXELS
from nextstep_jax.data.packing import STAT_KEYS, PackedBatches, PackingOptions, PixelImages, TokenImages
from nextstep_jax.data.prepare import IMAGE_INPUTS, PrepareDocument, PrepareOptions
from nextstep_jax.data.shapes import ShapesConfig
from nextstep_jax.data.sources import RecordSource, ShapesSource

SHAPES = "shapes"


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
    source: str  # a record directory, or "shapes" (the synthetic set at DataConfig.image_size)
    weight: float = 1.0
    split: str = "train"  # shapes only
    num_samples: int = 100_000  # shapes only
    shapes_seed: int = 0  # shapes only: which synthetic dataset (the pipeline seed only orders it)
    shapes_caption_order_grid: int = 0  # shapes only: ShapesConfig.caption_order_grid (0: as sampled)


_SECTION, _MODEL = data_config(), model_config()  # defaults of the config's data and model sections


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """One process's view of the data section (fields documented in ``configs.data_config``); build it from
    the whole config with ``from_config``, which derives the model facts and the per-process batch."""

    seq_len: int = _SECTION.seq_len
    batch_size: int = 1  # packed rows per process per step
    image_input: str = _SECTION.image_input
    image_size: int = _SECTION.image_size
    multi_aspect: bool = _SECTION.multi_aspect
    patch_size: int = _MODEL.latent_patch_size
    latent_channels: int = _MODEL.latent_channels
    max_images_per_row: int | None = _SECTION.max_images_per_row
    caption_dropout: float = _SECTION.caption_dropout
    edit_dropout: float = _SECTION.edit_dropout
    document_masking: bool = _SECTION.document_masking
    max_pixels: int = DEFAULT_MAX_PIXELS
    seed: int = _SECTION.seed
    num_epochs: int | None = _SECTION.num_epochs
    num_workers: int = _SECTION.num_workers
    worker_buffer_size: int = _SECTION.worker_buffer_size
    prefetch_batches: int = _SECTION.prefetch_batches
    read_threads: int = _SECTION.read_threads
    read_buffer_size: int = _SECTION.read_buffer_size
    shard_index: int | None = None  # None: jax.process_index()
    shard_count: int | None = None  # None: jax.process_count()

    def __post_init__(self):
        if self.image_input not in IMAGE_INPUTS:
            raise ValueError(f"image_input must be one of {IMAGE_INPUTS}")
        if self.image_input == "pixels" and self.multi_aspect:
            raise ValueError("multi_aspect needs image_input='latents': pixel batches hold one image size "
                             "(cache latents with `python -m nextstep_jax.encode_latents`)")
        if self.seq_len < 1 or self.batch_size < 1:
            raise ValueError("seq_len and batch_size must be >= 1")
        bucket_grids(self.image_size, self.multi_aspect)  # validates image_size
        if self.max_images_per_row is not None and self.max_images_per_row < 1:
            raise ValueError("max_images_per_row must be >= 1")
        if (self.shard_index is None) != (self.shard_count is None):
            raise ValueError("set both shard_index and shard_count, or neither")
        if self.shard_count is not None and not 0 <= self.shard_index < self.shard_count:
            raise ValueError(f"shard_index {self.shard_index} not in [0, {self.shard_count})")

    @classmethod
    def from_config(cls, config, *, process_index: int | None = None, process_count: int | None = None
                    ) -> "DataConfig":
        """This process's DataConfig from a whole config (sections ``data``, ``model``, ``vae``).

        ``data.batch_size`` counts packed rows over all processes and is split evenly over them (default:
        the JAX processes); patch size and latent channels are the model's, and the VAE down factor times the
        patch size must be the pixels per token the image buckets are cut to.
        """
        if (process_index is None) != (process_count is None):
            raise ValueError("give both process_index and process_count, or neither")
        if process_count is None:
            import jax

            process_index, process_count = jax.process_index(), jax.process_count()
        data, model, vae = config.data, config.model, config.vae
        if data.batch_size % process_count:
            raise ValueError(f"data.batch_size={data.batch_size} packed rows per step do not split evenly over "
                             f"{process_count} processes")
        if model.latent_channels != vae.z_channels:
            raise ValueError(f"model.latent_channels={model.latent_channels} but vae.z_channels={vae.z_channels}")
        # The encoder halves the resolution at every ch_mult level after the first (models/vae.py).
        pixels_per_token = 2 ** (len(vae.ch_mult) - 1) * model.latent_patch_size
        if pixels_per_token != PIXELS_PER_TOKEN:
            raise ValueError(f"vae.ch_mult={tuple(vae.ch_mult)} and model.latent_patch_size="
                             f"{model.latent_patch_size} give {pixels_per_token} pixels per image token; the "
                             f"data pipeline's image buckets are cut in {PIXELS_PER_TOKEN}-pixel tokens")
        fields = {f.name for f in dataclasses.fields(cls)} - {"batch_size", "patch_size", "latent_channels",
                                                               "max_pixels", "shard_index", "shard_count"}
        return cls(**{name: data[name] for name in fields}, batch_size=data.batch_size // process_count,
                   patch_size=model.latent_patch_size, latent_channels=model.latent_channels,
                   max_pixels=DEFAULT_MAX_PIXELS if data.max_pixels is None else data.max_pixels,
                   shard_index=process_index, shard_count=process_count)


def dataset_specs(config) -> list[DatasetSpec]:
    """The DatasetSpecs of ``config.data.datasets`` (each a dict of DatasetSpec fields)."""
    known = {f.name for f in dataclasses.fields(DatasetSpec)}
    specs = []
    for i, entry in enumerate(config.data.datasets):
        entry = dict(entry)
        unknown = set(entry) - known
        if "source" not in entry or unknown:
            raise ValueError(f"data.datasets[{i}]={entry}: needs 'source' and only the fields {sorted(known)}")
        specs.append(DatasetSpec(**entry))
    return specs


def image_slots(config: DataConfig) -> int:
    """Image slots per row of a pixel batch; by default the most images a row can hold."""
    if config.max_images_per_row is not None:
        return config.max_images_per_row
    side = config.image_size // PIXELS_PER_TOKEN
    return max(1, config.seq_len // (side * side + 3))  # an image block is h·w + >= 3 tokens


def image_targets_per_row(config: DataConfig) -> int | None:
    """A bound on the image tokens of any row of a token batch (the flow-matching targets the train step gathers),
    when ``max_images_per_row`` caps the images per row; None otherwise (pixel batches bound themselves)."""
    if config.image_input != "latents" or config.max_images_per_row is None:
        return None
    return config.max_images_per_row * max(h * w for h, w in bucket_grids(config.image_size, config.multi_aspect))


def batch_spec(config: DataConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """Shapes and dtypes of every batch array (e.g. to trace the train step before data exists)."""
    bt = (config.batch_size, config.seq_len)
    spec = {k: (bt, np.dtype(np.int32)) for k in ("input_ids", "labels", "segment_ids", "positions",
                                                  "image_loss_mask")}
    if config.image_input == "latents":
        spec["image_tokens"] = (bt + (config.latent_channels * config.patch_size**2,), np.dtype(np.float32))
    else:
        s = config.image_size
        spec["images"] = ((config.batch_size, image_slots(config), s, s, 3), np.dtype(np.float32))
        spec["image_slots"] = (bt, np.dtype(np.int32))
    return spec


def make_documents(config: DataConfig, datasets: Sequence[DatasetSpec], tokenizer) -> grain.IterDataset:
    """The stream of ``Document``/``Skipped`` this process packs (sharded, shuffled, mixed)."""
    if not datasets:
        raise ValueError("no datasets given")
    weights = [d.weight for d in datasets]
    if min(weights) <= 0:
        raise ValueError(f"dataset weights must be > 0, got {weights}")
    shard_index, shard_count = _shard(config)
    prepare = PrepareDocument(tokenizer, PrepareOptions(
        image_input=config.image_input,
        grids=bucket_grids(config.image_size, config.multi_aspect),
        seq_len=config.seq_len,
        caption_dropout=config.caption_dropout,
        edit_dropout=config.edit_dropout,
        max_images=image_slots(config) if config.image_input == "pixels" else config.max_images_per_row,
        max_pixels=config.max_pixels,
        patch_size=config.patch_size,
        latent_channels=config.latent_channels,
    ))
    per_dataset = []
    for i, spec in enumerate(datasets):
        ds = grain.MapDataset.source(_open_source(spec, config))
        if len(ds) < shard_count:
            raise ValueError(f"{spec.source}: {len(ds)} samples cannot be split over {shard_count} processes")
        ds = ds[shard_index::shard_count]
        ds = ds.shuffle(seed=_derive_seed(config.seed, "shuffle", i)).repeat(config.num_epochs)
        per_dataset.append(ds.random_map(prepare, seed=_derive_seed(config.seed, "prepare", i)))
    mixed = per_dataset[0] if len(per_dataset) == 1 else grain.MapDataset.mix(per_dataset, weights)
    return mixed.to_iter_dataset(grain.ReadOptions(num_threads=config.read_threads,
                                                   prefetch_buffer_size=config.read_buffer_size))


def make_dataset(config: DataConfig, datasets: Sequence[DatasetSpec], tokenizer) -> grain.IterDataset:
    """The Grain dataset of packed batches (each with a ``stats`` dict; DataIterator strips it)."""
    docs = make_documents(config, datasets, tokenizer)
    if config.image_input == "latents":
        layout = TokenImages(config.latent_channels * config.patch_size**2, config.max_images_per_row)
    else:
        layout = PixelImages(image_slots(config), config.image_size, config.image_size, PIXELS_PER_TOKEN)
    batches = PackedBatches(docs, PackingOptions(
        batch_size=config.batch_size, seq_len=config.seq_len, pad_id=tokenizer.special.pad,
        placeholder_id=tokenizer.special.placeholder, images=layout,
        document_masking=config.document_masking))
    if config.num_workers > 0:
        batches = batches.mp_prefetch(grain.MultiprocessingOptions(
            num_workers=config.num_workers, per_worker_buffer_size=config.worker_buffer_size))
    elif config.prefetch_batches > 0:
        # Packing runs in a thread beside the step instead of between steps; each batch carries the state after
        # it, so a checkpoint holds the position of the last batch taken, not of the ones prepared ahead.
        batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=config.prefetch_batches)
    return batches


def make_iterator(config: DataConfig, datasets: Sequence[DatasetSpec], tokenizer) -> "DataIterator":
    return DataIterator(make_dataset(config, datasets, tokenizer))


class DataIterator(grain.DatasetIterator):
    """Yields model batches (stats removed) and keeps cumulative data metrics, part of its state."""

    _TOTALS = STAT_KEYS + ("token_slots",)

    def __init__(self, dataset: grain.IterDataset):
        super().__init__(dataset.__iter__())
        self._totals = dict.fromkeys(self._TOTALS, 0)

    def __next__(self) -> dict[str, np.ndarray]:
        batch = next(self._parent)
        stats = batch.pop("stats")
        for k in STAT_KEYS:
            self._totals[k] += int(stats[k])
        self._totals["token_slots"] += batch["input_ids"].size
        return batch

    def metrics(self) -> dict[str, float]:
        """Cumulative since the start of training: documents, tokens, truncated, skipped/<reason>,
        token_slots (B·T per batch) and pad_fraction = 1 - tokens / token_slots."""
        out = {f"data/{k}": float(v) for k, v in self._totals.items()}
        slots = self._totals["token_slots"]
        out["data/pad_fraction"] = 1.0 - self._totals["tokens"] / slots if slots else 0.0
        return out

    def get_state(self) -> dict[str, Any]:
        return {"pipeline": self._parent.get_state(), "totals": dict(self._totals)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["pipeline"])
        self._totals = {k: int(state["totals"].get(k, 0)) for k in self._TOTALS}


def _open_source(spec: DatasetSpec, config: DataConfig):
    if spec.source == SHAPES:
        if config.image_input != "pixels":
            raise ValueError("the shapes source renders pixels; cache latents to records for image_input='latents'")
        return ShapesSource(ShapesConfig(size=config.image_size, seed=spec.shapes_seed, split=spec.split,
                                         caption_order_grid=spec.shapes_caption_order_grid), spec.num_samples)
    return RecordSource(spec.source)


def _shard(config: DataConfig) -> tuple[int, int]:
    if config.shard_count is not None:
        return config.shard_index, config.shard_count
    import jax

    return jax.process_index(), jax.process_count()


def _derive_seed(seed: int, purpose: str, index: int) -> int:
    tag = int.from_bytes(purpose.encode(), "little")
    return int(np.random.SeedSequence([seed, tag, index]).generate_state(1)[0])
