import json
import os
import stat

import numpy as np
import pytest

from nextstep_jax.data.records import RecordWriter, decode_record, encode_record, shard_paths
from nextstep_jax.data.samples import BadSample, EncodedImage, LatentImage, PixelImage, Sample
from nextstep_jax.data.sources import RecordSource


def _samples():
    latent16 = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4) / 7
    latent32 = np.random.default_rng(0).standard_normal((4, 2, 16)).astype(np.float32)
    return [
        Sample("a", "t2i", ("a red circle ✓", EncodedImage(b"\xff\xd8jpegbytes", 30, 40))),
        Sample("b", "edit", (EncodedImage(b"src", 1, 2), "make it blue", EncodedImage(b"", 0, 0))),
        Sample("c", "text", ("plain text\nwith newline",)),
        Sample("d", "interleave", ("x", LatentImage(latent16), "y", LatentImage(latent32))),
        Sample("e", "t2i", ("z", EncodedImage(b"png", 5, 6))),
    ]


def _assert_same(a: Sample, b: Sample):
    assert (a.key, a.kind, len(a.segments)) == (b.key, b.kind, len(b.segments))
    for x, y in zip(a.segments, b.segments):
        assert type(x) is type(y)
        if isinstance(x, LatentImage):
            assert x.latent.dtype == y.latent.dtype
            np.testing.assert_array_equal(x.latent, y.latent)
        else:
            assert x == y


def test_record_roundtrip():
    for sample in _samples():
        _assert_same(decode_record(encode_record(sample)), sample)


def test_pixels_must_be_encoded_before_writing():
    with pytest.raises(TypeError, match="encode PixelImage"):
        encode_record(Sample("p", "t2i", ("c", PixelImage(np.zeros((2, 2, 3), np.uint8)))))


@pytest.mark.parametrize("mangle", [lambda b: b"XXXX" + b[4:], lambda b: b[:20], lambda b: b[:-2], lambda b: b""])
def test_corrupt_records_are_bad_records(mangle):
    data = encode_record(_samples()[0])
    with pytest.raises(BadSample) as e:
        decode_record(mangle(data))
    assert e.value.reason == "bad_record"


def test_writer_shards_meta_and_source_order(tmp_path):
    with RecordWriter(tmp_path / "r", records_per_shard=2) as writer:
        for s in _samples():
            writer.write(s)
    meta = json.loads((tmp_path / "r" / "meta.json").read_text())
    assert meta["num_records"] == 5
    assert [s["num_records"] for s in meta["shards"]] == [2, 2, 1]
    assert len(shard_paths(tmp_path / "r")) == 3
    source = RecordSource(tmp_path / "r")
    assert len(source) == 5
    for i, expected in enumerate(_samples()):
        _assert_same(source[i], expected)


def test_writer_is_deterministic_and_refuses_to_mix_builds(tmp_path):
    for name in ("one", "two"):
        with RecordWriter(tmp_path / name, records_per_shard=3) as writer:
            for s in _samples():
                writer.write(s)
    for f in sorted((tmp_path / "one").iterdir()):
        assert f.read_bytes() == (tmp_path / "two" / f.name).read_bytes()
    with pytest.raises(FileExistsError):
        RecordWriter(tmp_path / "one")


def test_unfinished_build_is_rejected(tmp_path):
    (tmp_path / "records-00000.array_record").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="meta.json"):
        RecordSource(tmp_path)


def test_a_build_appears_complete_or_not_at_all(tmp_path):
    old = os.umask(0o022)
    try:
        with pytest.raises(RuntimeError, match="input failed"):
            with RecordWriter(tmp_path / "failed", records_per_shard=2) as writer:
                for s in _samples():
                    writer.write(s)
                raise RuntimeError("input failed")
        (tmp_path / "empty").mkdir()
        with RecordWriter(tmp_path / "empty", records_per_shard=2) as writer:
            writer.write(_samples()[0])
            assert not any((tmp_path / "empty").iterdir())  # nothing visible until the build is complete
    finally:
        os.umask(old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]  # no leftovers of the failed build
    assert sorted(p.name for p in (tmp_path / "empty").iterdir()) == ["meta.json", "records-00000.array_record"]
    assert stat.S_IMODE((tmp_path / "empty").stat().st_mode) == 0o755
    assert {stat.S_IMODE(p.stat().st_mode) for p in (tmp_path / "empty").iterdir()} == {0o644}
