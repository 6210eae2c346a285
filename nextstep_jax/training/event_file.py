"""TensorBoard event files without TensorFlow: scalar ``Event`` protos, hand-encoded, in TFRecord framing.

TFRecord: ``uint64 length``, ``uint32 masked_crc32c(length bytes)``, the data, ``uint32 masked_crc32c(data)``,
all little-endian. The protos used (field number: type):
  Event      1: double wall_time, 2: int64 step, 3: string file_version, 5: Summary summary,
             6: SessionLog session_log
  Summary    1: repeated Value value;  Value 1: string tag, 2: float simple_value
  SessionLog 1: enum status (START = 1): TensorBoard drops the events at or after its step that an earlier
             run of the same log directory wrote, which is what a resumed run wants.
"""

from __future__ import annotations

import os
import socket
import struct
import time
from pathlib import Path

_CRC_TABLE = []
for _byte in range(256):
    _crc = _byte
    for _ in range(8):
        _crc = (_crc >> 1) ^ 0x82F63B78 if _crc & 1 else _crc >> 1  # Castagnoli polynomial, reflected
    _CRC_TABLE.append(_crc)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def masked_crc32c(data: bytes) -> int:
    crc = crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # int64 two's complement, as protobuf
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire_type) + payload


def _bytes_field(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def _event(step: int, wall_time: float, body: bytes) -> bytes:
    return _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step)) + body


def scalar_event(step: int, values: dict[str, float], wall_time: float | None = None) -> bytes:
    summary = b"".join(_bytes_field(1, _bytes_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", value)))
                       for tag, value in values.items())
    return _event(step, time.time() if wall_time is None else wall_time, _bytes_field(5, summary))


def tfrecord(data: bytes) -> bytes:
    length = struct.pack("<Q", len(data))
    return length + struct.pack("<I", masked_crc32c(length)) + data + struct.pack("<I", masked_crc32c(data))


class EventFileWriter:
    """Appends scalar summaries to ``logdir/events.out.tfevents.<time>.<host>`` (flushed per write)."""

    def __init__(self, logdir: str | Path, *, start_step: int | None = None):
        self.logdir = Path(logdir)
        self.logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        name = f"events.out.tfevents.{int(now)}.{socket.gethostname()}.{os.getpid()}"
        self.path = self.logdir / name
        k = 0
        while self.path.exists():  # a second writer within the same second: never append to another run
            k += 1
            self.path = self.logdir / f"{name}.{k}"
        self._file = open(self.path, "xb")
        self._write(_event(0, now, _bytes_field(3, b"brain.Event:2")))
        if start_step is not None:
            self._write(_event(start_step, now, _bytes_field(6, _field(1, 0, _varint(1)))))

    def _write(self, data: bytes) -> None:
        self._file.write(tfrecord(data))
        self._file.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if values:
            self._write(scalar_event(step, values))

    def close(self) -> None:
        self._file.close()
