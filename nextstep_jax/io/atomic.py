"""Atomic writes: a file or folder appears under its final name complete, or not at all.

Everything is written into a hidden temporary next to the destination (same file system, so the rename is
atomic), flushed to disk, renamed into place, and the parent folder is flushed so the rename itself
survives a crash. Temporaries get the ordinary modes (0666 / 0777 less the umask: 0644 / 0755 under umask
022), not ``tempfile``'s private 0600 / 0700, so what is published reads like any file the user writes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

__all__ = ["atomic_file", "atomic_folder", "fsync", "fsync_tree", "write_file"]


def _temporary(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")


def fsync(path: str | os.PathLike) -> None:
    """Flush one file or folder (its entries) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: str | os.PathLike) -> None:
    """Flush every file and folder under ``root``, so a rename never publishes data still in flight."""
    for folder, _, files in os.walk(root):
        for name in [*files, "."]:
            fsync(os.path.join(folder, name))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[BinaryIO]:
    """A binary file to write; it replaces ``path`` when the block succeeds and vanishes when not."""
    path = Path(path)
    tmp = _temporary(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync(path.parent)


def write_file(path: str | os.PathLike, data: bytes) -> None:
    with atomic_file(path) as f:
        f.write(data)


@contextlib.contextmanager
def atomic_folder(dest: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """A fresh folder to fill; it becomes ``dest`` when the block succeeds and is deleted when not.

    With ``overwrite`` an existing ``dest`` is replaced only once the new folder is complete.
    """
    dest = Path(dest).absolute()
    if dest.exists() and not overwrite:
        raise FileExistsError(f"{dest}: already exists")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(dest)
    tmp.mkdir()
    try:
        yield tmp
        fsync_tree(tmp)
        if dest.exists():
            old = tmp.with_suffix(".old")
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            tmp.rename(dest)
        fsync(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
