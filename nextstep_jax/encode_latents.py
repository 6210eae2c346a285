"""Cache VAE latents: records with images -> records with latents, so training can skip the VAE.

    python -m nextstep_jax.encode_latents --records IN --out OUT --vae VAE_DIR [--config FILE] \
        [--image-size 256] [--multi-aspect] [--batch-size 16] [--latent-dtype float32]

Each image goes through the pipeline's transform (decode, nearest bucket, resize + centre crop,
[-1, 1]); images of one bucket are encoded together in fixed-size batches (padded, so each bucket
compiles once), jitted and split over all local devices. Records keep their order, key, kind and text.
The cached latent is the VAE posterior *mean* in model space, ``(mean - shift) * scale``; the released
tokenizer is deterministic, so that is exactly what the official trainer feeds. Train on pixels to keep
posterior noise of a stochastic VAE. Resolution and buckets default to the config's ``data.image_size`` and
``data.multi_aspect``, the VAE's compute dtype to ``vae.dtype``. Last stdout line:
``{"written", "skipped", "skipped_by_reason"}``. Bad input: one ``error:`` line on stderr, exit status 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter, defaultdict, deque
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tqdm import tqdm

from nextstep_jax import configs, host_memory
from nextstep_jax.checkpoint import CheckpointError, load_vae
from nextstep_jax.data import images as image_ops
from nextstep_jax.data.buckets import bucket_grids
from nextstep_jax.data.records import LATENT_DTYPES, RecordWriter
from nextstep_jax.data.samples import BadSample, EncodedImage, LatentImage, PixelImage, Sample, Skipped
from nextstep_jax.data.sources import RecordSource
from nextstep_jax.models.vae import AutoencoderKL, to_model_latents

# encode_fn(params, images [N, H, W, 3] float32 in [-1, 1]) -> latents [N, H/8, W/8, C] in model space.
EncodeFn = Callable[[Any, Any], Any]


def vae_encode_fn(vae_dir: str | Path, dtype: str | None = None) -> tuple[EncodeFn, Any]:
    """(encode_fn, params) for a VAE release folder or converted checkpoint; ``dtype``: the compute dtype
    (None: the VAE config's); params are float32."""
    cfg, params = load_vae(vae_dir, dtype="float32")
    if dtype is not None:
        cfg = configs.replace(cfg, dtype=dtype)
    model = AutoencoderKL(cfg)

    def encode(p, images):
        mean, _ = model.apply({"params": p}, images, method=AutoencoderKL.encode)
        return to_model_latents(mean, cfg)

    return encode, params


def sharded_encoder(encode_fn: EncodeFn, params: Any, batch_size: int) -> tuple[Callable, int]:
    """Jit ``encode_fn`` with the batch split over all local devices; returns (run, padded batch size)."""
    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.local_devices()
    batch_size = -(-batch_size // len(devices)) * len(devices)
    mesh = Mesh(np.asarray(devices), ("data",))
    split, replicated = NamedSharding(mesh, PartitionSpec("data")), NamedSharding(mesh, PartitionSpec())
    params = jax.device_put(params, replicated)
    jitted = jax.jit(encode_fn, in_shardings=(replicated, split), out_shardings=split)

    def run(images: np.ndarray) -> np.ndarray:
        return np.asarray(jitted(params, jax.device_put(images, split)))

    return run, batch_size


class _PendingSample:
    def __init__(self, sample: Sample, num_images: int):
        self.sample = sample
        self.latents: list[np.ndarray | None] = [None] * num_images

    @property
    def done(self) -> bool:
        return all(x is not None for x in self.latents)

    def with_latents(self, dtype: str) -> Sample:
        latents = iter(self.latents)
        segments = tuple(s if isinstance(s, (str, LatentImage)) else LatentImage(next(latents).astype(dtype))
                         for s in self.sample.segments)
        return Sample(self.sample.key, self.sample.kind, segments)


class _BucketBatcher:
    """Queues images per shape; encodes a queue when it holds a full batch (or on flush, padded)."""

    def __init__(self, run: Callable[[np.ndarray], np.ndarray], batch_size: int):
        self._run, self._batch_size = run, batch_size
        self._queues: dict[tuple, list] = defaultdict(list)
        self.images_encoded = 0

    def add(self, pixels: np.ndarray, deliver: Callable[[np.ndarray], None]) -> None:
        queue = self._queues[pixels.shape]
        queue.append((pixels, deliver))
        if len(queue) == self._batch_size:
            self._encode(pixels.shape)

    def flush(self) -> None:
        for shape in [s for s, q in self._queues.items() if q]:
            self._encode(shape)

    def _encode(self, shape: tuple) -> None:
        items, self._queues[shape] = self._queues[shape], []
        batch = np.zeros((self._batch_size,) + shape, np.float32)
        batch[: len(items)] = np.stack([px for px, _ in items])
        latents = self._run(batch)
        for (_, deliver), latent in zip(items, latents):
            deliver(latent)
        self.images_encoded += len(items)


def encode_records(records: str | Path | RecordSource, out_dir: str | Path, run: Callable[[np.ndarray], np.ndarray],
                   batch_size: int, *, image_size: int, multi_aspect: bool, latent_dtype: str = "float32",
                   max_pixels: int = image_ops.DEFAULT_MAX_PIXELS, records_per_shard: int = 1000,
                   progress: bool = True) -> dict:
    """Encode every image of ``records`` (a record directory, or a random-access source of samples such as its
    ``RecordSource`` or a ``ShapesSource``) with ``run`` (a batch of exactly ``batch_size``)."""
    if latent_dtype not in LATENT_DTYPES:
        raise ValueError(f"latent_dtype must be one of {LATENT_DTYPES}")
    grids = bucket_grids(image_size, multi_aspect)
    source = RecordSource(records) if isinstance(records, (str, Path)) else records
    batcher = _BucketBatcher(run, batch_size)
    pending: deque[_PendingSample] = deque()
    max_pending = 8 * batch_size * len(grids)
    skipped: Counter[str] = Counter()
    with RecordWriter(out_dir, records_per_shard) as writer:
        for index in tqdm(range(len(source)), desc="encode", unit="record", disable=not progress, file=sys.stderr):
            sample = source[index]
            if isinstance(sample, Skipped):
                skipped[sample.reason] += 1
                continue
            to_encode = [s for s in sample.segments if isinstance(s, (EncodedImage, PixelImage))]
            try:
                pixels = [image_ops.bucketed_pixels(image, grids, max_pixels)[0] for image in to_encode]
            except BadSample as e:
                skipped[e.reason] += 1
                continue
            item = _PendingSample(sample, len(pixels))
            pending.append(item)
            for j, px in enumerate(pixels):
                batcher.add(px, lambda latent, item=item, j=j: item.latents.__setitem__(j, latent))
            if len(pending) > max_pending:
                batcher.flush()
            while pending and pending[0].done:
                writer.write(pending.popleft().with_latents(latent_dtype))
        batcher.flush()
        while pending:
            writer.write(pending.popleft().with_latents(latent_dtype))
        written = writer.num_written
    return {"written": written, "skipped": sum(skipped.values()), "skipped_by_reason": dict(sorted(skipped.items()))}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.encode_latents", description=__doc__.split("\n")[0])
    configs.add_config_arguments(p)
    p.add_argument("--records", required=True, help="input record directory (images)")
    p.add_argument("--out", required=True, help="output record directory (latents; must be empty or absent)")
    p.add_argument("--vae", required=True, help="VAE folder: config.json + checkpoint.pt or checkpoint.safetensors")
    p.add_argument("--image-size", type=int, help="training resolution, a multiple of 16 (default: data.image_size)")
    p.add_argument("--multi-aspect", action=argparse.BooleanOptionalAction,
                   help="aspect-ratio buckets instead of square crops (default: data.multi_aspect)")
    p.add_argument("--batch-size", type=int, default=16, help="images per encoder call (rounded to devices)")
    p.add_argument("--latent-dtype", default="float32", choices=LATENT_DTYPES)
    p.add_argument("--records-per-shard", type=int, default=1000)
    p.add_argument("--max-pixels", type=int, default=image_ops.DEFAULT_MAX_PIXELS)
    p.add_argument("--no-progress", action="store_true")
    return p


def _run(args: argparse.Namespace, overrides: list[str]) -> int:
    config = configs.resolve(args, overrides)
    image_size = config.data.image_size if args.image_size is None else args.image_size
    multi_aspect = config.data.multi_aspect if args.multi_aspect is None else args.multi_aspect
    bucket_grids(image_size, multi_aspect)  # validates the size before the VAE loads
    source = RecordSource(args.records)
    encode_fn, params = vae_encode_fn(args.vae, config.vae.dtype)
    run, batch_size = sharded_encoder(encode_fn, params, args.batch_size)
    summary = encode_records(source, args.out, run, batch_size, image_size=image_size, multi_aspect=multi_aspect,
                             latent_dtype=args.latent_dtype, max_pixels=args.max_pixels,
                             records_per_shard=args.records_per_shard, progress=not args.no_progress)
    print(json.dumps(summary), flush=True)
    return 0


def main(argv=None) -> int:
    args, overrides = configs.parse_args(_parser(), argv)
    try:
        return _run(args, overrides)
    except (configs.ConfigError, CheckpointError, OSError, ValueError) as e:  # a failed run leaves no --out
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    host_memory.restart_with_huge_pages()
    sys.exit(main())
