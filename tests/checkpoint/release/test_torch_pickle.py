"""torch.save reader tests. No torch: hostile and unusual checkpoints are assembled from raw pickle opcodes
laid out exactly as torch writes them (see the golden vae/checkpoint.pt)."""

import json
import os
import pickle
import struct
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from nextstep_jax.checkpoint.errors import CheckpointError
from nextstep_jax.checkpoint.mapping import vae_table
from nextstep_jax.checkpoint.release.config import vae_config_from_release
from nextstep_jax.checkpoint.release.torch_pickle import load_torch_state_dict

# ----------------------------------------------------------------------------------- pickle assembly


def _global(module, name):
    return b"c" + f"{module}\n{name}\n".encode()


def _str(text):
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw


def _int(value):
    return b"J" + struct.pack("<i", value)


def _tuple(*items):
    return b"(" + b"".join(items) + b"t"


def _tensor(storage_type, key, numel, offset, size, stride, rebuild="_rebuild_tensor_v2"):
    storage = _tuple(_str("storage"), _global("torch", storage_type), _str(key), _str("cpu"), _int(numel)) + b"Q"
    args = [storage, _int(offset), _tuple(*map(_int, size)), _tuple(*map(_int, stride))]
    if rebuild == "_rebuild_tensor_v2":
        args += [b"\x89", _global("collections", "OrderedDict") + b")R"]  # requires_grad, backward_hooks
    return _global("torch._utils", rebuild) + _tuple(*args) + b"R"


def _parameter(tensor):
    hooks = _global("collections", "OrderedDict") + b")R"
    return _global("torch._utils", "_rebuild_parameter") + _tuple(tensor, b"\x88", hooks) + b"R"


def _dict(items, ordered=False):
    start = _global("collections", "OrderedDict") + b")R" if ordered else b"}"
    return start + b"(" + b"".join(_str(k) + v for k, v in items.items()) + b"u"


def _pickle(body):
    return b"\x80\x02" + body + b"."


def _checkpoint(path, data_pkl, storages, prefix="archive", byteorder=b"little"):
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr(f"{prefix}/data.pkl", data_pkl)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, array in storages.items():
            zf.writestr(f"{prefix}/data/{key}", np.ascontiguousarray(array).tobytes())
        zf.writestr(f"{prefix}/version", "3\n")
    return path


ARANGE = np.arange(12, dtype=np.float32)


# ------------------------------------------------------------------------------------------- golden


def test_golden_vae_checkpoint_matches_its_safetensors_copy(golden_dir):
    got = load_torch_state_dict(golden_dir / "vae" / "checkpoint.pt")
    assert "torch" not in sys.modules
    want = safetensors.numpy.load_file(golden_dir / "vae" / "checkpoint.safetensors")
    cfg = vae_config_from_release(json.loads((golden_dir / "vae" / "config.json").read_text()))
    assert sorted(got) == sorted(want) and len(want) == len(vae_table(cfg))  # every tensor its config implies
    for key, array in want.items():
        assert got[key].dtype == array.dtype and got[key].shape == array.shape, key
        assert got[key].tobytes() == array.tobytes(), key


# ------------------------------------------------------------------------------------- layouts/dtypes


def test_strided_offset_and_shared_storages_rebuild_like_torch(tmp_path):
    tensors = {
        "contiguous": _tensor("FloatStorage", "0", 12, 0, (3, 4), (4, 1)),
        "transposed": _tensor("FloatStorage", "0", 12, 0, (4, 3), (1, 4)),
        "offset_slice": _tensor("FloatStorage", "0", 12, 5, (2, 3), (4, 1)),
        "every_other": _tensor("FloatStorage", "0", 12, 1, (3,), (4,)),
        "expanded": _tensor("FloatStorage", "0", 12, 8, (2, 4), (0, 1)),
        "scalar": _tensor("FloatStorage", "0", 12, 11, (), ()),
        "empty": _tensor("FloatStorage", "0", 12, 0, (0, 5), (5, 1)),
        "legacy_rebuild": _tensor("FloatStorage", "0", 12, 2, (2,), (1,), rebuild="_rebuild_tensor"),
        "parameter": _parameter(_tensor("FloatStorage", "0", 12, 0, (6, 2), (2, 1))),
    }
    got = load_torch_state_dict(_checkpoint(tmp_path / "x.pt", _pickle(_dict(tensors)), {"0": ARANGE}))
    grid = ARANGE.reshape(3, 4)
    want = {
        "contiguous": grid,
        "transposed": grid.T,
        "offset_slice": grid[1:, 1:],
        "every_other": ARANGE[1::4],
        "expanded": np.broadcast_to(ARANGE[8:12], (2, 4)),
        "scalar": np.array(11, np.float32),
        "empty": np.zeros((0, 5), np.float32),
        "legacy_rebuild": ARANGE[2:4],
        "parameter": ARANGE.reshape(6, 2),
    }
    assert list(got) == list(want)
    for key, array in want.items():
        assert got[key].dtype == np.float32 and got[key].flags.c_contiguous, key
        np.testing.assert_array_equal(got[key], array, err_msg=key)
    got["contiguous"][0, 0] = -1  # contiguous tensors share their storage, as in torch
    assert got["parameter"][0, 0] == -1


@pytest.mark.parametrize("storage_type,array", [
    ("DoubleStorage", np.linspace(-1, 1, 6)),
    ("HalfStorage", np.linspace(-1, 1, 6).astype(np.float16)),
    ("BFloat16Storage", np.array([0x7FC1, 0xFF80, 1, 0x8000, 0x3F80, 0xC000], np.uint16).view(ml_dtypes.bfloat16)),
    ("LongStorage", np.array([-(2**62), 2**62, -1, 0, 1, 7], np.int64)),
    ("IntStorage", np.arange(-3, 3, dtype=np.int32)),
    ("ShortStorage", np.arange(-3, 3, dtype=np.int16)),
    ("CharStorage", np.arange(-3, 3, dtype=np.int8)),
    ("ByteStorage", np.arange(250, 256, dtype=np.uint8)),
    ("BoolStorage", np.array([True, False, True, True, False, False])),
])
def test_storage_dtypes_are_bit_exact(tmp_path, storage_type, array):
    body = _dict({"w": _tensor(storage_type, "0", 6, 0, (2, 3), (3, 1))}, ordered=True)
    got = load_torch_state_dict(_checkpoint(tmp_path / "x.pt", _pickle(body), {"0": array}))["w"]
    assert got.dtype == array.dtype and got.shape == (2, 3)
    assert got.tobytes() == array.tobytes()


def test_untyped_storage_counts_bytes(tmp_path):
    body = _dict({"w": _tensor("UntypedStorage", "0", 4, 1, (3,), (1,))})
    got = load_torch_state_dict(_checkpoint(tmp_path / "x.pt", _pickle(body), {"0": np.array([9, 8, 7, 6], np.uint8)}))
    np.testing.assert_array_equal(got["w"], np.array([8, 7, 6], np.uint8))


# ------------------------------------------------------------------------------------------ wrappers


def _weights():
    return _dict({"w": _tensor("FloatStorage", "0", 12, 0, (12,), (1,))})


def test_unambiguous_wrapper_is_unwrapped(tmp_path):
    body = _dict({"state_dict": _weights(), "epoch": _int(3), "name": _str("vae")})
    got = load_torch_state_dict(_checkpoint(tmp_path / "x.pt", _pickle(body), {"0": ARANGE}))
    assert list(got) == ["w"]
    np.testing.assert_array_equal(got["w"], ARANGE)


def test_ambiguous_wrapper_is_rejected(tmp_path):
    body = _dict({"state_dict": _weights(), "model": _weights()})
    path = _checkpoint(tmp_path / "x.pt", _pickle(body), {"0": ARANGE})
    with pytest.raises(CheckpointError, match="not unambiguously wrapped"):
        load_torch_state_dict(path)


@pytest.mark.parametrize("body,match", [
    (_dict({"w": _int(3)}), "entry 'w' is int"),
    (_tuple(_int(1)), "holds a tuple, not a state dict"),
])
def test_non_state_dicts_are_rejected(tmp_path, body, match):
    path = _checkpoint(tmp_path / "x.pt", _pickle(body), {})
    with pytest.raises(CheckpointError, match=match) as err:
        load_torch_state_dict(path)
    assert str(path) in str(err.value)


# ---------------------------------------------------------------------------------- hostile pickles


class _RunsShellCommand:
    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


@pytest.mark.parametrize("protocol", [2, 4])
def test_code_execution_payload_is_refused_without_running(tmp_path, protocol):
    marker = tmp_path / "pwned"
    payload = pickle.dumps({"w": _RunsShellCommand(f"touch {marker}")}, protocol=protocol)
    path = _checkpoint(tmp_path / "evil.pt", payload, {})
    with pytest.raises(CheckpointError, match=r"refusing to load global (os|posix)\.system") as err:
        load_torch_state_dict(path)
    assert str(path) in str(err.value)
    assert not marker.exists()
    pickle.loads(payload)  # the payload is live: plain pickle would have run it
    assert marker.exists()


@pytest.mark.parametrize("module,name,args", [
    ("builtins", "eval", _tuple(_str("1+1"))),
    ("subprocess", "Popen", _tuple(_str("true"))),
    ("torch", "load", _tuple(_str("other.pt"))),
    ("torch._utils", "_rebuild_qtensor", _tuple()),
    ("numpy", "frombuffer", _tuple(_str("abcd"))),
])
def test_other_globals_are_refused(tmp_path, module, name, args):
    body = _dict({"w": _global(module, name) + args + b"R"})
    path = _checkpoint(tmp_path / "x.pt", _pickle(body), {})
    with pytest.raises(CheckpointError, match=rf"{path}: refusing to load global {module}\.{name}"):
        load_torch_state_dict(path)


def test_storage_stand_ins_cannot_be_mutated(tmp_path):
    float_storage = _global("torch", "FloatStorage")
    body = _tuple(float_storage + b"}" + _str("dtype") + _str("int8") + b"sb", float_storage)  # BUILD on it
    with pytest.raises(CheckpointError, match="not a valid state-dict pickle"):
        load_torch_state_dict(_checkpoint(tmp_path / "x.pt", _pickle(body), {}))
    got = load_torch_state_dict(_checkpoint(tmp_path / "y.pt", _pickle(_weights()), {"0": ARANGE}))
    assert got["w"].dtype == np.float32


# ---------------------------------------------------------------------------------- damaged archives


@pytest.mark.parametrize("tensor,storages,match", [
    (_tensor("FloatStorage", "0", 12, 4, (3, 4), (4, 1)), {"0": ARANGE}, r"reads element 15 of a 12-element storage"),
    (_tensor("FloatStorage", "0", 13, 0, (12,), (1,)), {"0": ARANGE}, r"record has 48 bytes.*13 elements needs 52"),
    (_tensor("FloatStorage", "7", 12, 0, (12,), (1,)), {"0": ARANGE}, r"record 'archive/data/7' is missing"),
    (_tensor("FloatStorage", "0", 12, 0, (3, 4), (4,)), {"0": ARANGE}, r"invalid tensor layout"),
])
def test_inconsistent_tensor_records(tmp_path, tensor, storages, match):
    path = _checkpoint(tmp_path / "x.pt", _pickle(_dict({"w": tensor})), storages)
    with pytest.raises(CheckpointError, match=match) as err:
        load_torch_state_dict(path)
    assert str(path) in str(err.value)


def test_bad_persistent_id(tmp_path):
    body = _dict({"w": _tuple(_str("storage"), _str("x")) + b"Q"})
    with pytest.raises(CheckpointError, match="unsupported persistent id"):
        load_torch_state_dict(_checkpoint(tmp_path / "x.pt", _pickle(body), {}))


def test_big_endian_archive_is_rejected(tmp_path):
    path = _checkpoint(tmp_path / "x.pt", _pickle(_weights()), {"0": ARANGE}, byteorder=b"big")
    with pytest.raises(CheckpointError, match="byte order b'big'"):
        load_torch_state_dict(path)


def test_archive_without_byteorder_record_is_little_endian(tmp_path):
    path = _checkpoint(tmp_path / "x.pt", _pickle(_weights()), {"0": ARANGE}, prefix="old", byteorder=None)
    np.testing.assert_array_equal(load_torch_state_dict(path)["w"], ARANGE)


def test_zip_without_data_pkl(tmp_path):
    path = tmp_path / "x.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("archive/data/0", b"1234")
    with pytest.raises(CheckpointError, match=r"expected one '<prefix>/data.pkl'"):
        load_torch_state_dict(path)


def test_truncated_golden_checkpoint(golden_dir, tmp_path):
    path = tmp_path / "checkpoint.pt"
    path.write_bytes((golden_dir / "vae" / "checkpoint.pt").read_bytes()[:-5000])
    with pytest.raises(CheckpointError, match=rf"{path}: corrupt or truncated zip"):
        load_torch_state_dict(path)


def test_corrupted_record_fails_its_crc(golden_dir, tmp_path):
    data = bytearray((golden_dir / "vae" / "checkpoint.pt").read_bytes())
    with zipfile.ZipFile(golden_dir / "vae" / "checkpoint.pt") as zf:
        offset = zf.getinfo("checkpoint/data/0").header_offset
    name_len, extra_len = struct.unpack("<HH", data[offset + 26:offset + 30])  # local header: torch pads `extra`
    start = offset + 30 + name_len + extra_len
    data[start + 40] ^= 0xFF
    path = tmp_path / "checkpoint.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError, match=r"record 'checkpoint/data/0' is corrupt"):
        load_torch_state_dict(path)


@pytest.mark.parametrize("content,match", [
    (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.", "unsupported legacy"),  # legacy magic-number pickle
    (b"just some text", "not a torch.save checkpoint"),
])
def test_non_zip_files(tmp_path, content, match):
    path = tmp_path / "old.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=match) as err:
        load_torch_state_dict(path)
    assert str(path) in str(err.value)


_NOT_A_STORAGE = (_global("torch._utils", "_rebuild_tensor_v2")
                  + _tuple(_str("x"), _int(0), _tuple(), _tuple(), b"\x89", b"N") + b"R")
_NOT_A_TENSOR = _global("torch._utils", "_rebuild_parameter") + _tuple(_int(1), b"\x89", b"N") + b"R"


@pytest.mark.parametrize("data_pkl,match", [
    (_pickle(_dict({"w": _NOT_A_STORAGE})), "tensor rebuilt from str, not from a storage"),
    (_pickle(_dict({"w": _NOT_A_TENSOR})), "parameter rebuilt from int, not from a tensor"),
    (b"\x80\x02}(" + _str("w"), "not a valid state-dict pickle"),  # cut short
])
def test_malformed_pickles(tmp_path, data_pkl, match):
    path = _checkpoint(tmp_path / "x.pt", data_pkl, {})
    with pytest.raises(CheckpointError, match=match) as err:
        load_torch_state_dict(path)
    assert f"{path}: archive/data.pkl is not a valid state-dict pickle" in str(err.value)
