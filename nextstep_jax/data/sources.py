"""Grain random-access sources yielding ``Sample`` (or ``Skipped`` for records that do not parse)."""

from __future__ import annotations

from pathlib import Path

import grain

from nextstep_jax.data.records import decode_record, shard_paths
from nextstep_jax.data.samples import BadSample, PixelImage, Sample, Skipped
from nextstep_jax.data.shapes import ShapesConfig, generate


class RecordSource(grain.sources.RandomAccessDataSource):
    """A finished record build (``records.py``)."""

    def __init__(self, records_dir: str | Path):
        paths = shard_paths(records_dir)
        if not paths:
            raise ValueError(f"{records_dir} holds no records")
        self._source = grain.sources.ArrayRecordDataSource(paths)
        self._name = str(records_dir)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Sample | Skipped:
        data = self._source[index]
        try:
            return decode_record(data)
        except BadSample as e:
            return Skipped(e.reason, f"{self._name}[{index}]")

    def __repr__(self) -> str:
        return f"RecordSource({self._name!r}, {len(self)} records)"


class ShapesSource(grain.sources.RandomAccessDataSource):
    """``num_samples`` t2i samples of the synthetic shapes dataset, rendered on access (no files)."""

    def __init__(self, config: ShapesConfig, num_samples: int):
        if num_samples < 1:
            raise ValueError("num_samples must be >= 1")
        self.config = config
        self._len = num_samples

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: int) -> Sample:
        if not 0 <= index < self._len:
            raise IndexError(index)
        s = generate(self.config, index)
        key = f"shapes/{self.config.split}/{self.config.seed}/{index}"
        return Sample(key=key, kind="t2i", segments=(s.caption, PixelImage(s.image)))

    def __repr__(self) -> str:
        return f"ShapesSource({self.config}, {self._len} samples)"
