"""sae_diff.atomic: the one atomic writer (files and folders, durable or not)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sae_diff.atomic import atomic_dir, atomic_write


@pytest.mark.parametrize("durable", [False, True])
def test_atomic_write_bytes_and_callable(tmp_path: Path, durable: bool) -> None:
    target = tmp_path / "sub" / "f.bin"
    assert atomic_write(target, b"one", durable=durable) == target
    assert target.read_bytes() == b"one"
    atomic_write(target, lambda p: p.write_bytes(b"two"), durable=durable)
    assert target.read_bytes() == b"two"
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600
    assert sorted(p.name for p in target.parent.iterdir()) == ["f.bin"]  # no temporary left


def test_a_failed_write_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "f.txt"
    atomic_write(target, b"old")

    def broken(p: Path) -> None:
        p.write_bytes(b"half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, broken)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("durable", [False, True])
def test_atomic_dir_replaces_a_folder_whole(tmp_path: Path, durable: bool) -> None:
    final = tmp_path / "ckpt"
    atomic_dir(final, lambda d: (d / "a").write_text("1"), durable=durable)
    atomic_dir(final, lambda d: (d / "b").write_text("2"), durable=durable)
    assert sorted(p.name for p in final.iterdir()) == ["b"]  # the old folder's files are gone

    def broken(d: Path) -> None:
        (d / "c").write_text("3")
        raise OSError("interrupted")

    with pytest.raises(OSError, match="interrupted"):
        atomic_dir(final, broken)
    assert sorted(p.name for p in final.iterdir()) == ["b"]
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt"]  # no temporary folders left
