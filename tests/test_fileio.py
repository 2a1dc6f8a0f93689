"""Atomic writes: all or nothing under the real name, and the file mode a plain write would give."""

from __future__ import annotations

import os
import stat
import sys

import pytest
import torch

from dreamid_core.fileio import atomic_save_safetensors, atomic_write, current_umask

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="POSIX file modes")


@pytest.fixture
def umask():
    """Set the process umask for one test, and put the old one back."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@posix_only
@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077, 0o027])
def test_new_files_follow_the_umask(tmp_path, umask, mask):
    umask(mask)
    assert current_umask() == mask
    path = atomic_save_safetensors({"x": torch.zeros(2)}, tmp_path / "e.safetensors", {})
    plain = tmp_path / "plain.txt"
    plain.write_text("x")  # what any other program writing a file gets
    assert mode(path) == mode(plain) == 0o666 & ~mask


@posix_only
def test_replacing_a_file_keeps_its_mode(tmp_path, umask):
    umask(0o022)
    path = tmp_path / "e.txt"
    path.write_text("old")
    os.chmod(path, 0o640)
    with atomic_write(path) as tmp:
        tmp.write_text("new")
    assert path.read_text() == "new" and mode(path) == 0o640


def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    path = tmp_path / "e.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError), atomic_write(path) as tmp:
        tmp.write_text("half")
        raise RuntimeError("interrupted")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["e.txt"]
