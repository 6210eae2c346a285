"""Atomic writes publish complete files and folders with the umask's modes, and nothing when interrupted."""

import os

import pytest

from nextstep_jax.io.atomic import atomic_file, atomic_folder, write_file


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(path) -> int:
    return path.stat().st_mode & 0o777


def test_file_is_published_whole_with_mode_0644(tmp_path, umask_022):
    write_file(tmp_path / "a.bin", b"first")
    write_file(tmp_path / "a.bin", b"second")
    assert (tmp_path / "a.bin").read_bytes() == b"second" and _mode(tmp_path / "a.bin") == 0o644
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_umask_is_respected_not_overridden(tmp_path):
    old = os.umask(0o077)
    try:
        write_file(tmp_path / "private", b"x")
        with atomic_folder(tmp_path / "folder") as tmp:
            (tmp / "inner").write_bytes(b"y")
    finally:
        os.umask(old)
    assert _mode(tmp_path / "private") == 0o600 and _mode(tmp_path / "folder") == 0o700


def test_interrupted_file_leaves_the_old_one(tmp_path):
    write_file(tmp_path / "a.bin", b"old")
    with pytest.raises(KeyboardInterrupt):
        with atomic_file(tmp_path / "a.bin") as f:
            f.write(b"half")
            raise KeyboardInterrupt
    assert (tmp_path / "a.bin").read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["a.bin"]


def test_folder_is_published_whole_with_mode_0755(tmp_path, umask_022):
    with atomic_folder(tmp_path / "out") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "x.txt").write_text("x")
        assert not (tmp_path / "out").exists()
    assert _mode(tmp_path / "out") == 0o755 and _mode(tmp_path / "out" / "sub" / "x.txt") == 0o644
    with pytest.raises(FileExistsError, match="already exists"):
        with atomic_folder(tmp_path / "out"):
            pass


def test_folder_overwrite_replaces_only_once_complete(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old.txt").write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("interrupted")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["old.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
    with atomic_folder(tmp_path / "out", overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["new.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
