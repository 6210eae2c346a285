"""The canonical on-disk format: ArrayRecord shards of one-sample records, plus ``meta.json``.

One record = ``b"NSJ1"`` + little-endian uint32 header length + UTF-8 JSON header + payload bytes.
The header is ``{"key": str, "kind": str, "segments": [...]}`` where each segment is one of
``{"text": str}``, ``{"image": {"offset", "length", "height", "width"}}`` (compressed image bytes, sizes
after EXIF rotation) or ``{"latent": {"offset", "length", "dtype", "shape"}}`` (little-endian array
[H/8, W/8, C]); offsets index the payload. Shards are written with ``group_size:1`` (true random access)
and no compression (payloads are already compressed images or float latents).

``meta.json`` lists the shards in order with their record counts. A build is written into a hidden folder
beside its destination and renamed into place only when complete (``nextstep_jax.io.atomic``): a failed or
interrupted build leaves nothing behind, and files get the ordinary umask-derived modes.
"""

from __future__ import annotations

import contextlib
import json
import struct
from pathlib import Path

import numpy as np

from nextstep_jax.data.samples import BadSample, EncodedImage, LatentImage, PixelImage, Sample
from nextstep_jax.io.atomic import atomic_folder

MAGIC = b"NSJ1"
FORMAT = "nextstep_jax.records/1"
META_FILE = "meta.json"
WRITER_OPTIONS = "group_size:1,uncompressed"
LATENT_DTYPES = ("float16", "float32")


def encode_record(sample: Sample) -> bytes:
    segments, payload, offset = [], [], 0
    for seg in sample.segments:
        if isinstance(seg, str):
            segments.append({"text": seg})
            continue
        if isinstance(seg, EncodedImage):
            blob = seg.data
            segments.append({"image": {"offset": offset, "length": len(blob), "height": seg.height,
                                       "width": seg.width}})
        elif isinstance(seg, LatentImage):
            dtype = seg.latent.dtype.name
            if dtype not in LATENT_DTYPES:
                raise TypeError(f"latent dtype {dtype} not in {LATENT_DTYPES}")
            blob = np.ascontiguousarray(seg.latent, dtype=seg.latent.dtype.newbyteorder("<")).tobytes()
            segments.append({"latent": {"offset": offset, "length": len(blob), "dtype": dtype,
                                        "shape": list(seg.latent.shape)}})
        elif isinstance(seg, PixelImage):
            raise TypeError("records store compressed images or latents; encode PixelImage first")
        else:
            raise TypeError(f"unknown segment type {type(seg).__name__}")
        payload.append(blob)
        offset += len(blob)
    header = json.dumps({"key": sample.key, "kind": sample.kind, "segments": segments},
                        ensure_ascii=False, separators=(",", ":")).encode()
    return b"".join([MAGIC, struct.pack("<I", len(header)), header, *payload])


def decode_record(data: bytes) -> Sample:
    """Parse one record; raises BadSample('bad_record') for bytes that are not a valid record."""
    try:
        if data[:4] != MAGIC:
            raise ValueError("bad magic")
        (n,) = struct.unpack_from("<I", data, 4)
        header = json.loads(data[8:8 + n])
        payload = memoryview(data)[8 + n:]
        segments = []
        for seg in header["segments"]:
            if "text" in seg:
                segments.append(str(seg["text"]))
            elif "image" in seg:
                m = seg["image"]
                blob = _slice(payload, m)
                segments.append(EncodedImage(bytes(blob), int(m["height"]), int(m["width"])))
            elif "latent" in seg:
                m = seg["latent"]
                if m["dtype"] not in LATENT_DTYPES:
                    raise ValueError(f"latent dtype {m['dtype']}")
                arr = np.frombuffer(_slice(payload, m), dtype=np.dtype(m["dtype"]).newbyteorder("<"))
                segments.append(LatentImage(arr.reshape(m["shape"]).astype(m["dtype"])))
            else:
                raise ValueError(f"unknown segment {sorted(seg)}")
        return Sample(key=str(header["key"]), kind=str(header["kind"]), segments=tuple(segments))
    except (ValueError, KeyError, TypeError, struct.error, UnicodeDecodeError) as e:
        raise BadSample("bad_record", str(e)) from None


def _slice(payload: memoryview, meta: dict) -> memoryview:
    start, length = int(meta["offset"]), int(meta["length"])
    if start < 0 or length < 0 or start + length > len(payload):
        raise ValueError("payload slice out of range")
    return payload[start:start + length]


class RecordWriter:
    """Writes samples in order into ``out_dir/records-NNNNN.array_record`` shards, then ``meta.json``;
    ``out_dir`` (absent or empty) appears on ``close``, complete.

    Output bytes depend only on the samples and ``records_per_shard`` (no timestamps, no randomness).
    """

    def __init__(self, out_dir: str | Path, records_per_shard: int = 1000):
        from array_record.python.array_record_module import ArrayRecordWriter

        if records_per_shard < 1:
            raise ValueError("records_per_shard must be >= 1")
        self._writer_cls = ArrayRecordWriter
        self.out_dir = Path(out_dir)
        if self.out_dir.exists() and (not self.out_dir.is_dir() or any(self.out_dir.iterdir())):
            raise FileExistsError(f"{self.out_dir} is not empty; refusing to mix two builds")
        self._publish = contextlib.ExitStack()
        # overwrite: an empty out_dir (checked above) is replaced by the finished build.
        self._folder = self._publish.enter_context(atomic_folder(self.out_dir, overwrite=True))
        self._per_shard = records_per_shard
        self._shards: list[dict] = []
        self._writer = None
        self.num_written = 0

    def write(self, sample: Sample) -> None:
        if self._writer is None or self._shards[-1]["num_records"] == self._per_shard:
            self._roll()
        self._writer.write(encode_record(sample))
        self._shards[-1]["num_records"] += 1
        self.num_written += 1

    def _roll(self) -> None:
        if self._writer is not None:
            self._writer.close()
        name = f"records-{len(self._shards):05d}.array_record"
        self._writer = self._writer_cls(str(self._folder / name), WRITER_OPTIONS)
        self._shards.append({"file": name, "num_records": 0})

    def close(self) -> None:
        """Finish the last shard, write ``meta.json`` and publish ``out_dir``."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        meta = {"format": FORMAT, "num_records": self.num_written, "shards": self._shards}
        (self._folder / META_FILE).write_text(json.dumps(meta, indent=1) + "\n")
        self._publish.close()

    def __enter__(self) -> "RecordWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
            return
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        self._publish.__exit__(exc_type, exc, tb)  # deletes the unfinished folder


def shard_paths(records_dir: str | Path) -> list[str]:
    """Shard files of a finished build, in order (validated against meta.json)."""
    root = Path(records_dir)
    meta_path = root / META_FILE
    if not meta_path.is_file():
        raise FileNotFoundError(f"{root} has no {META_FILE}: not a finished record build")
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_path}: format {meta.get('format')!r}, expected {FORMAT!r}")
    paths = [str(root / s["file"]) for s in meta["shards"] if s["num_records"] > 0]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise FileNotFoundError(f"{root}: shards listed in {META_FILE} are missing: {missing}")
    return paths
