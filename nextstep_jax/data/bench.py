"""Pipeline throughput benchmark (not a test): samples/s and tokens/s of packed batches.

    python -m nextstep_jax.data.bench [--workers 0 2] [--batches 40] [--seq-len 1024] [--batch-size 8]

Runs the pipeline on the synthetic shapes set (rendered on the fly) and on JPEG records (shapes
rendered at --jpeg-size, JPEG-encoded, built with the record writer into a temporary directory, then
decoded + resized by the pipeline), once per worker count. Worker start-up and the first batches are
excluded from the timing. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from absl import flags
from PIL import Image

from nextstep_jax.data.pipeline import DataConfig, DatasetSpec, make_iterator
from nextstep_jax.data.records import RecordWriter
from nextstep_jax.data.samples import EncodedImage, Sample
from nextstep_jax.data.shapes import ShapesConfig, generate
from nextstep_jax.data.tokenizer import load_tokenizer

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "tests" / "golden" / "tokenizer"
WARMUP_BATCHES = 3


def write_jpeg_records(out_dir: Path, num: int, size: int) -> None:
    config = ShapesConfig(size=size)
    with RecordWriter(out_dir) as writer:
        for i in range(num):
            s = generate(config, i)
            buf = io.BytesIO()
            Image.fromarray(s.image).save(buf, format="JPEG", quality=90)
            writer.write(Sample(f"jpeg/{i}", "t2i", (s.caption, EncodedImage(buf.getvalue(), size, size))))


def measure(config: DataConfig, spec: DatasetSpec, tokenizer, batches: int) -> dict:
    iterator = make_iterator(config, [spec], tokenizer)
    try:
        for _ in range(WARMUP_BATCHES):
            next(iterator)
        start_docs, start_tokens = (iterator.metrics()[k] for k in ("data/documents", "data/tokens"))
        start = time.perf_counter()
        for _ in range(batches):
            next(iterator)
        seconds = time.perf_counter() - start
        m = iterator.metrics()
    finally:
        iterator.close()
    docs, tokens = m["data/documents"] - start_docs, m["data/tokens"] - start_tokens
    return {"samples_per_s": round(docs / seconds, 1), "tokens_per_s": round(tokens / seconds),
            "batches_per_s": round(batches / seconds, 2),
            "padded_tokens_per_s": round(batches * config.batch_size * config.seq_len / seconds)}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.data.bench", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--batches", type=int, default=40)
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--jpeg-size", type=int, default=256, help="side of the JPEGs stored in the records")
    p.add_argument("--jpeg-records", type=int, default=512)
    p.add_argument("--tokenizer", default=str(DEFAULT_TOKENIZER))
    args = p.parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags
    tokenizer = load_tokenizer(args.tokenizer)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / "jpeg"
        write_jpeg_records(records, args.jpeg_records, args.jpeg_size)
        for name, spec in (("shapes", DatasetSpec("shapes")), (f"jpeg{args.jpeg_size}_records", DatasetSpec(str(records)))):
            for workers in args.workers:
                config = DataConfig(seq_len=args.seq_len, batch_size=args.batch_size, image_size=args.image_size,
                                    num_workers=workers,
                                    shard_index=0, shard_count=1)
                results.append({"data": name, "workers": workers, **measure(config, spec, tokenizer, args.batches)})
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": {"seq_len": args.seq_len, "batch_size": args.batch_size, "image_size": args.image_size,
                   "jpeg_size": args.jpeg_size, "batches": args.batches},
        "results": results,
    }))


if __name__ == "__main__":
    main()
