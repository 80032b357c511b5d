"""Atomic writers: no partial file, no temporary file left behind, old file kept on failure."""

from __future__ import annotations

import os

import pytest

from cryonb.errors import ConfigError
from cryonb.io import atomic_path, atomic_write


def _names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_writes_complete_file(tmp_path):
    target = tmp_path / "out.bin"
    with atomic_write(target) as f:
        f.write(b"abc")
        assert not target.exists()  # nothing visible before the block ends
        tmp = [n for n in _names(tmp_path) if n.startswith(".out.bin.tmp-")]
        assert len(tmp) == 1 and f"-{os.getpid()}-" in tmp[0]
    assert target.read_bytes() == b"abc"
    assert _names(tmp_path) == ["out.bin"]


def test_text_mode(tmp_path):
    with atomic_write(tmp_path / "t.txt", "w") as f:
        f.write("line\n")
    assert (tmp_path / "t.txt").read_bytes() == b"line\n"


def test_failure_leaves_no_target_and_no_temp(tmp_path):
    target = tmp_path / "out.bin"
    with pytest.raises(RuntimeError, match="midway"), atomic_write(target) as f:
        f.write(b"half")
        raise RuntimeError("midway")
    assert _names(tmp_path) == []


def test_failure_keeps_existing_target(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    os.chmod(target, 0o640)
    with pytest.raises(KeyboardInterrupt), atomic_write(target, "w") as f:
        f.write("new")
        raise KeyboardInterrupt
    assert target.read_text() == "old"
    assert _names(tmp_path) == ["out.txt"]
    with atomic_write(target, "w") as f:
        f.write("new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o777 == 0o640  # permissions kept


def test_atomic_path_for_name_based_writers(tmp_path):
    target = tmp_path / "x.dat"
    with atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.exists()
        tmp.write_bytes(b"123")
    assert target.read_bytes() == b"123"


def test_bad_mode_and_missing_folder(tmp_path):
    with pytest.raises(ConfigError, match="mode"), atomic_write(tmp_path / "x", "a"):
        pass
    with pytest.raises(ConfigError, match="does not exist"), atomic_write(tmp_path / "no/x"):
        pass
