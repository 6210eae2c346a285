import json
import re
import shutil
import struct

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from nextstep_jax.checkpoint.dtypes import DTYPES
from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.release.safetensors import (
    INDEX_FILE_NAME,
    SINGLE_FILE_NAME,
    SafetensorsReader,
    TensorSpec,
    write_safetensors,
    write_sharded,
)

SHARD1, SHARD2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"


def _library_load(files):
    tensors = {}
    for f in files:
        tensors.update(safetensors.numpy.load_file(f))
    return tensors


def _specs_from(reader, keys=None):
    return [TensorSpec(k, reader.info(k).shape, DTYPES[reader.info(k).dtype], lambda k=k: reader.read(k))
            for k in (reader.keys() if keys is None else keys)]


def _assert_same_tensors(got: dict, want: dict):
    assert sorted(got) == sorted(want)
    for key, array in want.items():
        assert got[key].dtype == array.dtype and got[key].shape == array.shape, key
        assert got[key].tobytes() == array.tobytes(), key


def _weight_map(golden_dir) -> dict[str, str]:
    """The golden sharded release's own key -> shard table (its index file, read with json)."""
    return json.loads((golden_dir / "model_sharded" / INDEX_FILE_NAME).read_text())["weight_map"]


@pytest.fixture
def sharded_copy(golden_dir, tmp_path):
    dst = tmp_path / "sharded"
    shutil.copytree(golden_dir / "model_sharded", dst)
    return dst


# ------------------------------------------------------------------------------------------ reading goldens


@pytest.mark.parametrize("folder,files", [("model", [SINGLE_FILE_NAME]), ("model_sharded", [SHARD1, SHARD2])])
def test_golden_release_reads_like_the_library(golden_dir, folder, files):
    want = _library_load([golden_dir / folder / f for f in files])
    with SafetensorsReader(golden_dir / folder) as reader:
        assert [f.name for f in reader.files] == files
        assert reader.metadata == {"format": "pt"}
        for key, array in want.items():
            assert reader.info(key) == (array.shape, "F32")
        _assert_same_tensors({k: reader.read(k) for k in reader.keys()}, want)
    assert sorted(want) == sorted(_weight_map(golden_dir))


def test_single_file_and_index_paths_are_accepted(golden_dir):
    with SafetensorsReader(golden_dir / "vae" / "checkpoint.safetensors") as reader:
        _assert_same_tensors({k: reader.read(k) for k in reader.keys()},
                             safetensors.numpy.load_file(golden_dir / "vae" / "checkpoint.safetensors"))
    tensors = _library_load([golden_dir / "model_sharded" / f for f in (SHARD1, SHARD2)])
    with SafetensorsReader(golden_dir / "model_sharded" / INDEX_FILE_NAME) as reader:
        assert reader.index_metadata == {"total_size": sum(a.nbytes for a in tensors.values())}
        assert {k: reader.file_of(k).name for k in reader.keys()} == _weight_map(golden_dir)


def test_info_comes_from_headers_only(golden_dir, monkeypatch):
    def no_reads(*args, **kwargs):
        raise AssertionError("tensor data was read")

    config = json.loads((golden_dir / "model_sharded" / "config.json").read_text())
    shapes = {k: a.shape for k, a in _library_load([golden_dir / "model_sharded" / f for f in (SHARD1, SHARD2)]).items()}
    monkeypatch.setattr(SafetensorsReader, "_file", no_reads)
    with SafetensorsReader(golden_dir / "model_sharded") as reader:
        assert reader.info("embed_tokens.weight") == ((config["vocab_size"], config["hidden_size"]), "F32")
        assert {k: reader.info(k) for k in reader.keys()} == {k: (shape, "F32") for k, shape in shapes.items()}
        assert "lm_head.weight" in reader and len(reader) == len(shapes)


def test_read_returns_a_fresh_writable_copy(golden_dir):
    with SafetensorsReader(golden_dir / "model") as reader:
        first = reader.read("norm.weight")
        original = first.copy()
        first[:] = 0
        np.testing.assert_array_equal(reader.read("norm.weight"), original)
        assert first.flags.c_contiguous and first.flags.owndata


def test_unknown_key_names_the_key(golden_dir):
    with SafetensorsReader(golden_dir / "model") as reader, pytest.raises(CheckpointError, match="'nope'"):
        reader.read("nope")


# ------------------------------------------------------------------------------------------------ writing


def test_rewriting_the_golden_file_is_byte_identical(golden_dir, tmp_path):
    src = golden_dir / "model" / SINGLE_FILE_NAME
    with SafetensorsReader(src) as reader:
        out = write_safetensors(tmp_path / "copy.safetensors", _specs_from(reader), metadata=reader.metadata)
    assert out.read_bytes() == src.read_bytes()


def test_resharding_the_golden_release_is_byte_identical(golden_dir, tmp_path):
    src = golden_dir / "model_sharded"
    with SafetensorsReader(src) as reader:
        keys = sorted(reader.keys(), key=lambda k: reader.file_of(k).name)
        first_shard_bytes = sum(spec.nbytes for spec in _specs_from(reader) if reader.file_of(spec.key).name == SHARD1)
        written = write_sharded(tmp_path, _specs_from(reader, keys), first_shard_bytes, metadata=reader.metadata)
    assert [p.name for p in written] == [SHARD1, SHARD2, INDEX_FILE_NAME]
    for path in written:
        assert path.read_bytes() == (src / path.name).read_bytes(), path.name


def test_write_sharded_small_shards_round_trip(golden_dir, tmp_path):
    with SafetensorsReader(golden_dir / "model") as reader:
        want = {k: reader.read(k) for k in reader.keys()}
        written = write_sharded(tmp_path, _specs_from(reader), max_shard_size_bytes=100_000)
    shards, index_path = written[:-1], written[-1]
    assert index_path.name == INDEX_FILE_NAME and len(shards) > 5
    n = len(shards)
    assert [p.name for p in shards] == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    index = json.loads(index_path.read_text())
    assert index["metadata"] == {"total_size": sum(a.nbytes for a in want.values())}
    assert sorted(index["weight_map"]) == sorted(want)
    for shard in shards:
        tensors = safetensors.numpy.load_file(shard)
        assert all(index["weight_map"][k] == shard.name for k in tensors)
        assert sum(a.nbytes for a in tensors.values()) <= 100_000 or len(tensors) == 1
    _assert_same_tensors(_library_load(shards), want)
    with SafetensorsReader(tmp_path) as reader:
        _assert_same_tensors({k: reader.read(k) for k in reader.keys()}, want)


def test_write_sharded_single_shard_replaces_a_previous_sharded_export(golden_dir, tmp_path):
    shutil.copytree(golden_dir / "model_sharded", tmp_path, dirs_exist_ok=True)
    array = np.arange(6, dtype=np.float32).reshape(2, 3)
    assert write_sharded(tmp_path, [TensorSpec.of("w", array)], 10**9) == [tmp_path / SINGLE_FILE_NAME]
    assert not (tmp_path / INDEX_FILE_NAME).exists()
    assert not (tmp_path / SHARD1).exists() and not (tmp_path / SHARD2).exists()
    assert (tmp_path / "config.json").exists()  # only weight files are touched
    _assert_same_tensors(safetensors.numpy.load_file(tmp_path / SINGLE_FILE_NAME), {"w": array})


def _every_dtype():
    rng = np.random.default_rng(0)
    arrays = {name: rng.standard_normal((3, 5)).astype(dtype) for name, dtype in DTYPES.items()}
    arrays["BOOL"] = rng.standard_normal((3, 5)) > 0
    arrays["scalar"] = np.array(7, np.int64)
    arrays["empty"] = np.zeros((0, 4), np.float32)
    arrays["BF16_bits"] = np.array([0x7FC1, 0xFF80, 0x0001, 0x8000], np.uint16).view(ml_dtypes.bfloat16)
    return arrays


def test_every_dtype_round_trips_bit_exactly(tmp_path):
    arrays = _every_dtype()
    path = write_safetensors(tmp_path / "all.safetensors", [TensorSpec.of(k, v) for k, v in arrays.items()],
                             metadata={"format": "np"})
    with SafetensorsReader(path) as reader:
        assert reader.metadata == {"format": "np"}
        _assert_same_tensors({k: reader.read(k) for k in reader.keys()}, arrays)
    # The library cannot hold bfloat16 in numpy; compare the rest both ways.
    plain = {k: v for k, v in arrays.items() if v.dtype != ml_dtypes.bfloat16}
    _assert_same_tensors(safetensors.numpy.load_file(write_safetensors(tmp_path / "plain.safetensors",
                                                                       map(TensorSpec.of, plain, plain.values()))),
                         plain)
    safetensors.numpy.save_file(plain, tmp_path / "lib.safetensors")
    assert (tmp_path / "lib.safetensors").read_bytes() == (tmp_path / "plain.safetensors").read_bytes()


def test_producers_run_lazily_once_each_in_file_order(tmp_path):
    calls = []

    def spec(key, dtype):
        def produce():
            calls.append(key)
            return np.ones((2,), dtype)
        return TensorSpec(key, (2,), dtype, produce)

    specs = [spec("b", np.float32), spec("a", np.float32), spec("c", np.float64)]
    assert calls == []
    write_safetensors(tmp_path / "x.safetensors", specs)
    assert calls == ["c", "a", "b"]  # library order: wider dtypes first, then by name


@pytest.mark.parametrize("produced", [np.zeros((2, 2), np.float32), np.zeros((4,), np.float64)])
def test_producer_mismatch_fails_without_leaving_files(tmp_path, produced):
    spec = TensorSpec("w", (4,), np.float32, lambda: produced)
    with pytest.raises(CheckpointError, match=r"'w'.*declared \(4,\) float32"):
        write_safetensors(tmp_path / "x.safetensors", [spec])
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_bad_specs(tmp_path):
    with pytest.raises(CheckpointError, match="'w'.*complex64"):
        TensorSpec.of("w", np.zeros(2, np.complex64))
    with pytest.raises(CheckpointError, match="'w' is given twice"):
        write_safetensors(tmp_path / "x.safetensors", [TensorSpec.of("w", np.zeros(2))] * 2)
    with pytest.raises(CheckpointError, match="__metadata__"):
        TensorSpec.of("__metadata__", np.zeros(2))
    with pytest.raises(ValueError, match="max_shard_size_bytes"):
        write_sharded(tmp_path, [TensorSpec.of("w", np.zeros(2))], 0)


# -------------------------------------------------------------------------------------------- bad inputs


def test_missing_shard(sharded_copy):
    (sharded_copy / SHARD2).unlink()
    with pytest.raises(CheckpointError, match=f"{SHARD2}.*missing") as err:
        SafetensorsReader(sharded_copy)
    assert INDEX_FILE_NAME in str(err.value)


@pytest.mark.parametrize("cut,match", [
    ("in the tensor data", r"tensor '.*' ends at byte \d+ but the file has only"),
    ("in the header", "header length {header} runs past the end"),
    ("in the length field", "too short"),
])
def test_truncated_file(golden_dir, tmp_path, cut, match):
    path = tmp_path / SINGLE_FILE_NAME
    data = (golden_dir / "model" / SINGLE_FILE_NAME).read_bytes()
    header = struct.unpack("<Q", data[:8])[0]  # the format's little-endian u64 header length
    keep = {"in the tensor data": len(data) - 100, "in the header": 8 + header // 2, "in the length field": 5}[cut]
    path.write_bytes(data[:keep])
    with pytest.raises(CheckpointError, match=match.format(header=header)) as err:
        SafetensorsReader(tmp_path)
    assert str(path) in str(err.value)


def test_trailing_bytes_are_rejected(golden_dir, tmp_path):
    path = tmp_path / "x.safetensors"
    path.write_bytes((golden_dir / "model" / SINGLE_FILE_NAME).read_bytes() + b"\0" * 4)
    with pytest.raises(CheckpointError, match="4 unindexed bytes"):
        SafetensorsReader(path)


def _with_header(path, header: bytes, data: bytes = b""):
    path.write_bytes(struct.pack("<Q", len(header)) + header + data)
    return path


@pytest.mark.parametrize("header,match", [
    (b"{not json", "not valid JSON"),
    (b"\xff\xfe{}", "not valid JSON"),
    (b"[1, 2]", "must be a JSON object"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}, "a": {}}', "duplicate key 'a'"),
    (b'{"a": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}', "'a'.*unsupported dtype 'C64'"),
    (b'{"a": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}', r"'a'.*needs 12 bytes.*span 8"),
    (b'{"a": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}', "'a': invalid shape"),
    (b'{"a": {"dtype": "F32", "shape": [2]}}', "'a': header entry must have"),
    (b'{"a": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]},'
     b' "b": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]},'
     b' "c": {"dtype": "F32", "shape": [1], "data_offsets": [4, 8]}}', "'c' data starts at offset 4, expected 8"),
    (b'{"__metadata__": {"format": 1}}', "__metadata__ must map strings"),
])
def test_corrupt_header(tmp_path, header, match):
    path = _with_header(tmp_path / "bad.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match=match) as err:
        SafetensorsReader(path)
    assert str(path) in str(err.value)


def test_corrupted_golden_header(golden_dir, tmp_path):
    data = bytearray((golden_dir / "model" / SINGLE_FILE_NAME).read_bytes())
    data[8:40] = b"#" * 32
    (tmp_path / SINGLE_FILE_NAME).write_bytes(data)
    with pytest.raises(CheckpointError, match=f"{SINGLE_FILE_NAME}: safetensors header is not valid JSON"):
        SafetensorsReader(tmp_path)


def _edit_index(folder, edit):
    index = json.loads((folder / INDEX_FILE_NAME).read_text())
    edit(index["weight_map"])
    (folder / INDEX_FILE_NAME).write_text(json.dumps(index))


def test_index_names_a_key_absent_from_its_shard(sharded_copy):
    _edit_index(sharded_copy, lambda wm: wm.update({"bogus.weight": SHARD1}))
    with pytest.raises(CheckpointError, match=f"maps tensor 'bogus.weight' to {SHARD1}, which does not contain it"):
        SafetensorsReader(sharded_copy)


def test_shard_holds_a_key_the_index_does_not_list(golden_dir, sharded_copy):
    shard = _weight_map(golden_dir)["norm.weight"]
    _edit_index(sharded_copy, lambda wm: wm.pop("norm.weight"))
    with pytest.raises(CheckpointError, match=f"{shard}: holds tensor 'norm.weight' but .* does not list it"):
        SafetensorsReader(sharded_copy)


def test_key_present_in_two_shards(golden_dir, sharded_copy):
    weight_map = _weight_map(golden_dir)
    key = next(k for k, f in weight_map.items() if f == SHARD1)
    with SafetensorsReader(sharded_copy) as reader:
        shard2 = {k: reader.read(k) for k in reader.keys() if reader.file_of(k).name == SHARD2}
        shard2[key] = np.zeros(reader.info(key).shape, np.float32)
    safetensors.numpy.save_file(shard2, sharded_copy / SHARD2)
    with pytest.raises(CheckpointError, match=f"'{re.escape(key)}' is stored in both .*{SHARD1} and .*{SHARD2}"):
        SafetensorsReader(sharded_copy)


@pytest.mark.parametrize("shard", ["../model.safetensors", "/etc/passwd", "sub/x.safetensors", ""])
def test_index_shard_names_must_be_plain_file_names(sharded_copy, shard):
    _edit_index(sharded_copy, lambda wm: wm.update({"norm.weight": shard}))
    with pytest.raises(CheckpointError, match="'norm.weight' maps to invalid shard name"):
        SafetensorsReader(sharded_copy)


def test_index_without_weight_map(sharded_copy):
    (sharded_copy / INDEX_FILE_NAME).write_text('{"metadata": {}}')
    with pytest.raises(CheckpointError, match=f"{INDEX_FILE_NAME}: index has no 'weight_map'"):
        SafetensorsReader(sharded_copy)


def test_ambiguous_or_empty_folders(golden_dir, sharded_copy, tmp_path):
    shutil.copy(golden_dir / "model" / SINGLE_FILE_NAME, sharded_copy)
    with pytest.raises(CheckpointError, match="has both"):
        SafetensorsReader(sharded_copy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no model.safetensors or model.safetensors.index.json"):
        SafetensorsReader(tmp_path / "empty")
    with pytest.raises(CheckpointError, match="no such file"):
        SafetensorsReader(tmp_path / "absent.safetensors")
