"""Metrics: the jsonl lines, the TensorBoard event file read back with an independent TFRecord + protobuf
decoder (bitwise CRC-32C), resume truncation, and that a non-zero process writes nothing."""

import json
import math
import struct

import jax.numpy as jnp
import numpy as np
import pytest

from nextstep_jax.training.event_file import crc32c
from nextstep_jax.training.metrics import JSONL_NAME, TENSORBOARD_DIR, MetricsWriter, read_metrics


def _crc32c_bitwise(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 * (crc & 1))
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _records(path) -> list[bytes]:
    data, out, pos = path.read_bytes(), [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (length,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == _masked(_crc32c_bitwise(header))
        body = data[pos + 12:pos + 12 + length]
        assert struct.unpack("<I", data[pos + 12 + length:pos + 16 + length])[0] == _masked(_crc32c_bitwise(body))
        out.append(body)
        pos += 16 + length
    return out


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        b = buf[pos]
        value |= (b & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not b & 0x80:
            return value, pos


def _fields(buf: bytes) -> list[tuple[int, object]]:
    """Generic protobuf wire decoding: (field number, int | bytes | raw 4/8 bytes)."""
    out, pos = [], 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            assert wire == 2
            n, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + n], pos + n
        out.append((number, value))
    return out


def _events(logdir):
    """[(step, {tag: value} | marker)] of every event file in logdir."""
    out = []
    for path in sorted(logdir.glob("events.out.tfevents.*")):
        for record in _records(path):
            fields = dict(_fields(record))
            assert isinstance(struct.unpack("<d", fields[1])[0], float)
            step = fields.get(2, 0)
            if 3 in fields:
                out.append((step, fields[3].decode()))
            elif 6 in fields:
                out.append((step, ("session_log", dict(_fields(fields[6])))))
            else:
                values = {}
                for number, value in _fields(fields[5]):
                    assert number == 1
                    v = dict(_fields(value))
                    values[v[1].decode()] = struct.unpack("<f", v[2])[0]
                out.append((step, values))
    return out


def test_crc32c_check_value():
    assert crc32c(b"123456789") == 0xE3069283 == _crc32c_bitwise(b"123456789")


def test_jsonl_and_event_file(tmp_path):
    steps = {1: {"loss": 2.5, "lm_loss": jnp.float32(4.0), "lr": np.float32(1e-4)},
             2: {"loss": 2.25, "lm_loss": 3.5, "lr": 2e-4, "skipped_steps": 1},
             3: {"loss": float("nan"), "lm_loss": 3.0, "lr": 3e-4}}
    with MetricsWriter(tmp_path, total_steps=3, enabled=True) as writer:
        for step, metrics in steps.items():
            writer.write(step, metrics)
    lines = (tmp_path / JSONL_NAME).read_text().splitlines()
    assert [list(json.loads(line))[0] for line in lines] == ["step"] * 3
    rows = read_metrics(tmp_path / JSONL_NAME)
    assert rows[1] == {"step": 2, "loss": 2.25, "lm_loss": 3.5, "lr": 2e-4, "skipped_steps": 1.0}
    assert rows[0]["lr"] == pytest.approx(1e-4, rel=1e-7) and rows[2]["loss"] is None

    events = _events(tmp_path / TENSORBOARD_DIR)
    assert events[0] == (0, "brain.Event:2")
    scalars = events[1:]
    assert [s for s, _ in scalars] == [1, 2, 3]
    for (step, values), want in zip(scalars, steps.values()):
        assert values.keys() == want.keys()
        for k, v in want.items():
            got, expected = values[k], float(np.float32(v))
            assert (math.isnan(got) and math.isnan(expected)) or got == expected, (step, k)


def test_resume_drops_lines_after_the_restored_step(tmp_path):
    with MetricsWriter(tmp_path, total_steps=10, enabled=True, progress=False) as writer:
        for step in range(1, 7):
            writer.write(step, {"loss": float(step)})
    with MetricsWriter(tmp_path, total_steps=10, start_step=4, enabled=True, progress=False) as writer:
        writer.write(5, {"loss": 50.0})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path / JSONL_NAME)] == [
        (1, 1.0), (2, 2.0), (3, 3.0), (4, 4.0), (5, 50.0)]
    files = sorted((tmp_path / TENSORBOARD_DIR).glob("events.out.tfevents.*"))
    assert len(files) == 2
    second = _events(tmp_path / TENSORBOARD_DIR)[-3:]
    assert second == [(0, "brain.Event:2"), (5, ("session_log", {1: 1})), (5, {"loss": 50.0})]


def test_other_processes_write_nothing(tmp_path):
    with MetricsWriter(tmp_path / "run", total_steps=2, enabled=False) as writer:
        writer.write(1, {"loss": 1.0})
    assert not (tmp_path / "run").exists()


def test_plot_script_draws_each_curve(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    from PIL import Image

    with MetricsWriter(tmp_path, total_steps=40, enabled=True, progress=False) as writer:
        for step in range(1, 41):
            writer.write(step, {"loss": 3.0 / step, "im_loss": 1.0 + 0.01 * step})
    script = Path(__file__).resolve().parents[2] / "scripts" / "plot_metrics.py"
    out = tmp_path / "curves.png"
    run = subprocess.run([sys.executable, str(script), str(tmp_path / JSONL_NAME), "-o", str(out), "--keys",
                          "loss,im_loss", "--log"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    image = np.asarray(Image.open(out).convert("RGB"))
    panel = image.shape[0] // 2
    assert image.shape[0] == 2 * panel and panel > 100
    smooth = np.all(image == (20, 60, 170), axis=-1)  # the moving-average colour
    assert smooth[:panel].sum() > 100 and smooth[panel:].sum() > 100
    bad = subprocess.run([sys.executable, str(script), str(tmp_path / JSONL_NAME), "--keys", "nope"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "no finite values for ['nope']" in bad.stderr
