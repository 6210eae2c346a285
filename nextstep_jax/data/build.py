"""Build verified records from raw inputs.

    python -m nextstep_jax.data.build --images DIR --captions FILE.jsonl --out DIR     # image folder
    python -m nextstep_jax.data.build --tars 'shards/*.tar' [--kind t2i] --out DIR       # WebDataset tars
    python -m nextstep_jax.data.build --edits FILE.jsonl --images DIR --out DIR        # editing triplets
    python -m nextstep_jax.data.build --text FILE.jsonl --out DIR                      # plain text

Every image is decoded once (header checked against --max-pixels before any pixel is allocated);
samples that cannot be used are skipped with a reason, so records on disk are known good. Output is
deterministic (input order, no timestamps). Progress goes to stderr; the last stdout line is
``{"written": N, "skipped": M, "skipped_by_reason": {...}}``. Bad input (a missing file or folder, a non-empty
--out, inputs of which not one sample is usable): one ``error:`` line on stderr, exit status 2, no output folder.
"""

from __future__ import annotations

import argparse
import glob
import json
import multiprocessing
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from tqdm import tqdm

from nextstep_jax.data import raw_inputs
from nextstep_jax.data.images import DEFAULT_MAX_PIXELS, open_image
from nextstep_jax.data.records import RecordWriter
from nextstep_jax.data.samples import KINDS, BadSample, EncodedImage, Sample, Skipped, check_structure


class NoUsableSample(ValueError):
    """Not one input sample could be used: a wrong path or format, not a dataset."""


def verify(sample: Sample | Skipped, max_pixels: int = DEFAULT_MAX_PIXELS) -> Sample | Skipped:
    """Decode every image of ``sample``; return it with image sizes filled in, or Skipped(reason)."""
    if isinstance(sample, Skipped):
        return sample
    try:
        check_structure(sample)
        segments = []
        for seg in sample.segments:
            if isinstance(seg, EncodedImage):
                width, height = open_image(seg.data, max_pixels).size
                seg = EncodedImage(seg.data, height, width)
            segments.append(seg)
        return Sample(sample.key, sample.kind, tuple(segments))
    except BadSample as e:
        return Skipped(e.reason, sample.key)


class _Verifier:
    def __init__(self, max_pixels: int):
        self.max_pixels = max_pixels

    def __call__(self, sample):
        return verify(sample, self.max_pixels)


def build(samples: Iterable[Sample | Skipped], out_dir: str | Path, *, records_per_shard: int = 1000,
          max_pixels: int = DEFAULT_MAX_PIXELS, workers: int = 1, progress: bool = True) -> dict:
    """Verify and write ``samples``; returns the summary dict. Writes nothing and raises NoUsableSample when
    every sample is skipped."""
    skipped: Counter[str] = Counter()
    with RecordWriter(out_dir, records_per_shard) as writer:
        for result in tqdm(_verified(samples, max_pixels, workers), desc="build", unit="sample",
                           disable=not progress, file=sys.stderr):
            if isinstance(result, Skipped):
                skipped[result.reason] += 1
            else:
                writer.write(result)
        written = writer.num_written
        if not written:
            raise NoUsableSample(f"no usable sample (skipped {sum(skipped.values())}: {dict(sorted(skipped.items()))})")
    return {"written": written, "skipped": sum(skipped.values()), "skipped_by_reason": dict(sorted(skipped.items()))}


def _verified(samples, max_pixels: int, workers: int) -> Iterator[Sample | Skipped]:
    verifier = _Verifier(max_pixels)
    if workers <= 1:
        yield from map(verifier, samples)
        return
    with multiprocessing.get_context("spawn").Pool(workers) as pool:
        yield from pool.imap(verifier, samples, chunksize=16)  # imap keeps input order


def _parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m nextstep_jax.data.build", description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output directory (must be empty or absent)")
    p.add_argument("--images", help="image folder (with --captions; with --edits the base of its image paths, default: the edits "
                        "file's folder)")
    p.add_argument("--captions", help="JSONL of {file, caption} (with --images)")
    p.add_argument("--tars", help="tar file, directory of tars, or glob")
    p.add_argument("--kind", choices=KINDS, help="sample kind of --tars (default t2i)")
    p.add_argument("--edits", help="JSONL of {input_image, instruction, output_image}")
    p.add_argument("--text", help="JSONL of {text}")
    p.add_argument("--records-per-shard", type=int, default=1000)
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS,
                   help="skip images declaring more pixels (decompression bombs)")
    p.add_argument("--workers", type=int, default=1, help="processes decoding images (output order kept)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    modes = [m for m in ("captions", "tars", "edits", "text") if getattr(args, m)]
    if len(modes) != 1:
        p.error("give exactly one of --captions (with --images), --tars, --edits, --text")
    if args.captions and not args.images:
        p.error("--captions needs --images")
    if args.kind and not args.tars:
        p.error("--kind applies to --tars only")
    args.kind = args.kind or "t2i"
    return args


def _tar_paths(spec: str) -> list[str]:
    path = Path(spec)
    paths = sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else sorted(glob.glob(spec))
    if not paths:
        raise FileNotFoundError(f"no tar files match {spec!r}")
    return paths


def main(argv=None) -> int:
    args = _parse_args(argv)
    try:
        if args.images and not Path(args.images).is_dir():
            raise NotADirectoryError(f"--images {args.images}: no such folder")
        if args.captions:
            samples = raw_inputs.image_folder(args.images, args.captions)
        elif args.tars:
            samples = raw_inputs.webdataset_tars(_tar_paths(args.tars), args.kind)
        elif args.edits:
            samples = raw_inputs.editing_triplets(args.edits, args.images or Path(args.edits).parent)
        else:
            samples = raw_inputs.plain_text(args.text)
        summary = build(samples, args.out, records_per_shard=args.records_per_shard, max_pixels=args.max_pixels,
                        workers=args.workers, progress=not args.no_progress)
    except NoUsableSample as e:
        print(f"error: {args.captions or args.tars or args.edits or args.text}: {e}", file=sys.stderr)
        return 2
    except (OSError, ValueError) as e:  # unreadable inputs, a non-empty --out: nothing was written
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
