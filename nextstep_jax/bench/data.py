"""Pipeline throughput benchmark (not a test): samples/s and tokens/s of packed batches.

    python -m nextstep_jax.bench.data [--workers 0 2] [--batches 40] [--seq-len 1024] [--batch-size 8]
    python -m nextstep_jax.bench.data --config configs/tiny.py --config.data.read_threads=4

The pipeline settings are the config's ``data`` section (built-in defaults here: 1024-token rows, 8 rows per
batch, 64 px images); ``--seq-len``, ``--batch-size`` and ``--image-size`` set those three fields.

Runs the pipeline on the synthetic shapes set (rendered on the fly) and on JPEG records (shapes rendered at
--jpeg-size, JPEG-encoded, built with the record writer into a temporary directory, then decoded + resized by
the pipeline), once per worker count. Worker start-up and the first batches are excluded from the timing.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

from absl import flags
from PIL import Image

from nextstep_jax import configs
from nextstep_jax.data.pipeline import DataConfig, DatasetSpec, make_iterator
from nextstep_jax.data.records import RecordWriter
from nextstep_jax.data.samples import EncodedImage, Sample
from nextstep_jax.data.shapes import ShapesConfig, generate
from nextstep_jax.data.tokenizer import load_tokenizer

DEFAULT_TOKENIZER = Path(__file__).resolve().parents[2] / "tests" / "golden" / "tokenizer"
WARMUP_BATCHES = 3
# Flag dest -> ``data`` field.
DATA_FLAGS = {"seq_len": "seq_len", "batch_size": "batch_size", "image_size": "image_size"}


def bench_data_config():
    """The built-in defaults with this benchmark's sizes."""
    config = configs.default_config()
    config.data.update(seq_len=1024, batch_size=8, image_size=64)
    return config


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.bench.data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    configs.add_config_arguments(p)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="worker counts to measure (data.num_workers)")
    p.add_argument("--batches", type=int, default=40, help="timed batches per run")
    p.add_argument("--seq-len", type=int, help="data.seq_len (default 1024)")
    p.add_argument("--batch-size", type=int, help="data.batch_size (default 8)")
    p.add_argument("--image-size", type=int, help="data.image_size (default 64)")
    p.add_argument("--jpeg-size", type=int, default=256, help="side of the JPEGs stored in the records")
    p.add_argument("--jpeg-records", type=int, default=512)
    p.add_argument("--tokenizer", help="default: data.tokenizer, else the golden test tokenizer")
    args, overrides = configs.parse_args(p, argv)
    try:
        config = configs.resolve(args, overrides, default=bench_data_config())
        config.data.update({field: getattr(args, dest) for dest, field in DATA_FLAGS.items()
                            if getattr(args, dest) is not None})
        per_workers = {w: DataConfig.from_config(configs.apply_overrides(config, [f"data.num_workers={w}"]),
                                                 process_index=0, process_count=1) for w in args.workers}
        tokenizer = load_tokenizer(args.tokenizer or config.data.tokenizer or str(DEFAULT_TOKENIZER))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    flags.FLAGS.mark_as_parsed()  # Grain worker processes read absl flags
    data = config.data
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        records = Path(tmp) / "jpeg"
        write_jpeg_records(records, args.jpeg_records, args.jpeg_size)
        for name, spec in (("shapes", DatasetSpec("shapes")),
                           (f"jpeg{args.jpeg_size}_records", DatasetSpec(str(records)))):
            for workers, data_config in per_workers.items():
                results.append({"data": name, "workers": workers,
                                **measure(data_config, spec, tokenizer, args.batches)})
    print(json.dumps({
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform()},
        "config": {"seq_len": data.seq_len, "batch_size": data.batch_size, "image_size": data.image_size,
                   "jpeg_size": args.jpeg_size, "batches": args.batches},
        "results": results,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
