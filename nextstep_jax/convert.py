"""Convert NextStep-1 checkpoints between the official PyTorch release and our Orbax format.

    python -m nextstep_jax.convert import  RELEASE_DIR  CHECKPOINT_DIR  [--dtype bfloat16] [--no-scan-layers]
    python -m nextstep_jax.convert export  CHECKPOINT_DIR  RELEASE_DIR  [--max-shard-size 5GB] [--dtype ...]
    python -m nextstep_jax.convert inspect PATH [--all] [--json]
    python -m nextstep_jax.convert verify  A B [--atol 0]

Exit status: 0 success (verify: equal), 1 verify found differences, 2 bad input (one line on stderr naming
the file and tensor).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap

from nextstep_jax.checkpoint import conversion
from nextstep_jax.checkpoint.dtypes import CAST_TARGETS
from nextstep_jax.checkpoint.errors import CheckpointError

BAD_INPUT = 2
DIFFERENT = 1

_FORMATS = """\
Formats (detected from the path):
  NextStep release   config.json + model.safetensors, or model.safetensors.index.json + shards
  VAE release        config.json + checkpoint.safetensors or checkpoint.pt (read without torch)
  converted          a folder written by `import` (nextstep_checkpoint.json + Orbax items)
  bare tensors       a *.safetensors file, an index file, or a torch.save *.pt file (inspect/verify)
"""


def _wrap(text: str) -> str:
    return textwrap.fill(text, 100)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m nextstep_jax.convert", formatter_class=argparse.RawDescriptionHelpFormatter,
        description=_wrap("Convert NextStep-1 checkpoints between the official PyTorch release (safetensors) and "
                    "Orbax, bit for bit, one tensor at a time."),
        epilog=_FORMATS + "\nExit status: 0 ok, 1 verify found differences, 2 bad input.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{import,export,inspect,verify}")
    raw = argparse.RawDescriptionHelpFormatter

    p = sub.add_parser("import", formatter_class=raw, help="release folder -> converted Orbax checkpoint",
                       description=_wrap("Convert an official release folder (NextStep model or VAE tokenizer) into an "
                                   "Orbax checkpoint (tensorstore/OCDBT) plus our config. The release's other "
                                   "files (config.json verbatim, tokenizer files) are copied along and a model's "
                                   "vae/ is converted into the checkpoint's vae/, so that `export` gives the "
                                   "release back and sampling finds the VAE."),
                       epilog="Example:\n  python -m nextstep_jax.convert import NextStep-1.1 ckpt/nextstep-1.1 "
                              "--dtype bfloat16")
    p.add_argument("src", help="release folder")
    p.add_argument("dest", help="checkpoint folder to create")
    p.add_argument("--dtype", choices=sorted(CAST_TARGETS), default=None,
                   help="store floating-point parameters in this dtype (default: as in the release)")
    p.add_argument("--no-scan-layers", dest="scan_layers", action="store_false",
                   help="keep one params leaf per decoder layer instead of stacking them into [layers, ...]")
    _common(p)

    p = sub.add_parser("export", formatter_class=raw, help="converted checkpoint -> official release layout",
                       description=_wrap("Write a converted checkpoint back in the official layout: the same key names, "
                                   "config.json and other release files, every tensor in its release dtype. "
                                   "NextStep: the release's own safetensors files (or re-sharded with "
                                   "--max-shard-size, with model.safetensors.index.json). VAE: config.json + "
                                   f"{conversion.VAE_EXPORT_FILE} (also for a model's vae/)."),
                       epilog="Example:\n  python -m nextstep_jax.convert export ckpt/nextstep-1.1 NextStep-1.1-out "
                              "--max-shard-size 5GB")
    p.add_argument("src", help="converted checkpoint folder")
    p.add_argument("dest", help="release folder to create")
    p.add_argument("--max-shard-size", type=conversion.parse_size, default=None, metavar="SIZE",
                   help="re-shard into files of at most SIZE (5GB, 500MB, 2GiB, bytes); default: the "
                        "release's own files")
    p.add_argument("--dtype", choices=sorted(CAST_TARGETS), default=None,
                   help="write floating-point parameters in this dtype (default: their release dtype)")
    _common(p)

    p = sub.add_parser("inspect", formatter_class=raw, help="keys, shapes, dtypes, parameter count",
                       description=_wrap("Summarise any checkpoint: format, kind, config schema, tensors (numbered "
                                   "layers collapsed), parameter count and total bytes."),
                       epilog=_FORMATS)
    p.add_argument("path", help="checkpoint (any format)")
    p.add_argument("--all", action="store_true", help="list every tensor instead of collapsing layers")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")

    p = sub.add_parser("verify", formatter_class=raw, help="compare two checkpoints tensor by tensor",
                       description=_wrap("Compare two checkpoints of any formats tensor by tensor, by release key "
                                   "(a model's vae/ included). "
                                   "Exit 0 only if they hold the same keys with equal tensors (bit for bit, or "
                                   "within --atol), else 1 and the first differing keys."),
                       epilog=_FORMATS)
    p.add_argument("a", help="first checkpoint (any format)")
    p.add_argument("b", help="second checkpoint (any format)")
    p.add_argument("--atol", type=_tolerance, default=0.0,
                   help="absolute tolerance; with it, values are compared across dtypes (default 0: bit-exact)")
    p.add_argument("--limit", type=int, default=10, help="stop after this many differences (default 10)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def _tolerance(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also rejects nan
        raise ValueError(text)
    return value


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--overwrite", action="store_true", help="replace DEST if it exists (only once complete)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _progress(args) -> bool | None:
    return False if args.quiet else None


def _run(args) -> int:
    if args.command == "import":
        report = conversion.import_release(args.src, args.dest, dtype=args.dtype, scan_layers=args.scan_layers,
                                            overwrite=args.overwrite, progress=_progress(args))
    elif args.command == "export":
        report = conversion.export_release(args.src, args.dest, max_shard_size=args.max_shard_size,
                                            dtype=args.dtype, overwrite=args.overwrite, progress=_progress(args))
    elif args.command == "inspect":
        summary = conversion.inspect_checkpoint(args.path)
        print(json.dumps(summary, indent=1) if args.json else conversion.format_inspection(summary, args.all))
        return 0
    else:
        differences = conversion.verify_checkpoints(args.a, args.b, atol=args.atol, limit=args.limit,
                                                     progress=_progress(args))
        for line in differences:
            print(line)
        print("equal" if not differences else f"DIFFERENT ({len(differences)} shown)")
        return DIFFERENT if differences else 0
    for note in report.skipped:
        print(f"not copied: {note}", file=sys.stderr)
    print(f"{args.command}: {report.tensors} tensors, {report.bytes / 1e6:.1f} MB in {report.seconds:.1f} s "
          f"({report.mb_per_s:.0f} MB/s) -> {report.destination}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return _run(args)
    except (CheckpointError, OSError) as e:
        message = " ".join(str(e).split())
        print(f"error: {message}", file=sys.stderr)
        return BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
