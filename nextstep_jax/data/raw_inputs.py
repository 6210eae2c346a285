"""Readers of the raw inputs the builder accepts; each yields ``Sample`` or ``Skipped`` in input order.

  image folder + captions JSONL  one object per line: {"file": path relative to the folder, "caption"}
  WebDataset-style tars          members grouped by key (name up to the first dot); images KEY.jpg or
                                 KEY-<k>.jpg (k orders them); caption from KEY.json {"caption"} or
                                 KEY.txt; ``<image_k>`` tags in the caption place image k in the text
                                 (the official multi-image layout); text samples use {"text"}
  editing JSONL                  {"input_image", "instruction", "output_image"} (official field names),
                                 paths relative to the image folder
  text JSONL                     {"text"}
"""

from __future__ import annotations

import json
import re
import tarfile
from pathlib import Path
from typing import Iterator

from nextstep_jax.data.samples import BadSample, EncodedImage, Sample, Skipped

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp", "gif")
_IMAGE_TAG = re.compile(r"<image_(\d+)>")
_INDEXED_STEM = re.compile(r"(.+)-(\d+)")


def _jsonl(path: Path) -> Iterator[tuple[int, dict | None]]:
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                yield line_no, None
                continue
            yield line_no, obj if isinstance(obj, dict) else None


def _read_image(root: Path, name) -> EncodedImage:
    if not isinstance(name, str) or not name:
        raise BadSample("bad_structure", "image path missing")
    path = (root / name).resolve()
    if not path.is_relative_to(root.resolve()):
        raise BadSample("bad_structure", f"{name} points outside {root}")
    if not path.is_file():
        raise BadSample("missing_file", str(path))
    return EncodedImage(path.read_bytes())


def _nonempty_text(value) -> str:
    if not isinstance(value, str) or not value.strip():
        raise BadSample("missing_caption")
    return value


def _jsonl_samples(path: Path, build) -> Iterator[Sample | Skipped]:
    """``build(obj, key)`` for every JSONL object; unparsable lines and ``BadSample`` become ``Skipped``."""
    for line_no, obj in _jsonl(path):
        key = f"{path.name}:{line_no}"
        if obj is None:
            yield Skipped("bad_record", key)
            continue
        try:
            yield build(obj, key)
        except BadSample as e:
            yield Skipped(e.reason, key)


def image_folder(images_dir: str | Path, captions: str | Path) -> Iterator[Sample | Skipped]:
    root = Path(images_dir)

    def build(obj: dict, key: str) -> Sample:
        image = _read_image(root, obj.get("file"))
        return Sample(key=str(obj["file"]), kind="t2i", segments=(_nonempty_text(obj.get("caption")), image))

    return _jsonl_samples(Path(captions), build)


def editing_triplets(edits: str | Path, images_dir: str | Path) -> Iterator[Sample | Skipped]:
    root = Path(images_dir)

    def build(obj: dict, key: str) -> Sample:
        source = _read_image(root, obj.get("input_image"))
        instruction = _nonempty_text(obj.get("instruction"))
        target = _read_image(root, obj.get("output_image"))
        return Sample(key=str(obj.get("unique_id", key)), kind="edit", segments=(source, instruction, target))

    return _jsonl_samples(Path(edits), build)


def plain_text(path: str | Path) -> Iterator[Sample | Skipped]:
    def build(obj: dict, key: str) -> Sample:
        if not isinstance(obj.get("text"), str) or not obj["text"].strip():
            raise BadSample("empty_text")
        return Sample(key=key, kind="text", segments=(obj["text"],))

    return _jsonl_samples(Path(path), build)


def webdataset_tars(tars: list[str | Path], kind: str) -> Iterator[Sample | Skipped]:
    """Samples of ``kind`` from tar files, in the given order and member order."""
    for tar_path in tars:
        with tarfile.open(tar_path, mode="r|*") as archive:
            key, files = None, {}
            for member in archive:
                if not member.isfile():
                    continue
                folder, _, base = member.name.rpartition("/")
                stem, _, ext = base.partition(".")
                ext, index = ext.lower(), None
                m = _INDEXED_STEM.fullmatch(stem)
                if ext in IMAGE_EXTENSIONS and m:
                    stem, index = m.group(1), int(m.group(2))
                member_key = f"{folder}/{stem}" if folder else stem
                if member_key != key:
                    if key is not None:
                        yield _tar_sample(key, files, kind)
                    key, files = member_key, {}
                files[(ext, index)] = archive.extractfile(member).read()
            if key is not None:
                yield _tar_sample(key, files, kind)


def _tar_sample(key: str, files: dict, kind: str) -> Sample | Skipped:
    try:
        meta = {}
        if ("json", None) in files:
            meta = json.loads(files[("json", None)])
            if not isinstance(meta, dict):
                raise BadSample("bad_record", "json is not an object")
        images = [EncodedImage(data) for (ext, k), data in sorted(files.items(), key=lambda kv: kv[0][1] or 0)
                  if ext in IMAGE_EXTENSIONS]
        if kind == "text":
            text = meta.get("text", files.get(("txt", None), b"").decode("utf-8"))
            if not isinstance(text, str) or not text.strip():
                raise BadSample("empty_text")
            return Sample(key, kind, (text,))
        caption = meta.get("caption", files.get(("txt", None), b"").decode("utf-8"))
        caption = _nonempty_text(caption) if kind in ("t2i", "edit") else (caption or "")
        return Sample(key, kind, _interleave(caption, images))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        return Skipped("bad_record", f"{key}: {e}")
    except BadSample as e:
        return Skipped(e.reason, key)


def _interleave(caption: str, images: list[EncodedImage]) -> tuple:
    """Caption with <image_k> tags -> segments in reading order; untagged single image goes last."""
    tags = [int(k) for k in _IMAGE_TAG.findall(caption)]
    if not tags:
        if len(images) != 1:
            raise BadSample("bad_structure", f"{len(images)} images and no <image_k> tags")
        return (caption, images[0]) if caption.strip() else (images[0],)
    if sorted(tags) != list(range(len(images))):
        raise BadSample("bad_structure", f"tags {tags} do not match {len(images)} images")
    segments = []
    for i, piece in enumerate(_IMAGE_TAG.split(caption)):
        if i % 2:
            segments.append(images[int(piece)])
        elif piece.strip():
            segments.append(piece)
    return tuple(segments)
