"""Atomic writers in molft.io: complete files only, with the mode the umask asks for."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager

import pandas as pd
import pytest

from molft import io
from molft.io import atomic_path, current_umask, read_json, write_csv, write_json, write_text


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_written_files_respect_the_umask(tmp_path, mask, expected):
    frame = pd.DataFrame({"smiles": ["CCO"], "label": [1.0]})
    with umask(mask):
        assert current_umask() == mask
        write_json(tmp_path / "a.json", {"x": 1})
        write_text(tmp_path / "b.txt", "hello\n")
        write_csv(tmp_path / "c.csv", frame)
    assert [_mode(tmp_path / name) for name in ("a.json", "b.txt", "c.csv")] == [expected] * 3
    assert read_json(tmp_path / "a.json") == {"x": 1}


def test_umask_without_proc_is_read_once_and_restored(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "_PROC_STATUS", tmp_path / "no_such_status")
    monkeypatch.setattr(io, "_swapped_umask", None)
    with umask(0o002):
        assert current_umask() == 0o002
        assert os.umask(0o002) == 0o002  # left as it was
        write_text(tmp_path / "f.txt", "x")
    assert _mode(tmp_path / "f.txt") == 0o664


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "out" / "result.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("crash")
    assert not target.exists()
    assert list(target.parent.iterdir()) == []
