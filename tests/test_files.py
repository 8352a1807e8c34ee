"""Crash-safe writes (files.py): a reader sees the old file or the new one, and a folder swap interrupted at any
point leaves one whole folder (a training checkpoint, the converted model)."""

from __future__ import annotations

import os
import stat

import pytest

from lifealign_lite.checkpoint import settle
from lifealign_lite.files import atomic_write, settle_dir, swap_dir


def test_atomic_write_replaces_keeps_mode_and_leaves_no_temp(tmp_path):
    path = tmp_path / "sub" / "f.json"
    atomic_write(path, "one")
    assert path.read_text() == "one" and stat.S_IMODE(path.stat().st_mode) == 0o644
    os.chmod(path, 0o600)
    atomic_write(path, b"two")
    assert path.read_bytes() == b"two" and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(p.name for p in path.parent.iterdir()) == ["f.json"]


def test_atomic_write_that_fails_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "f.txt"
    atomic_write(path, "old")

    def boom(*a):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, "new")
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


def _folder(path, text, complete=True):
    path.mkdir()
    (path / "data").write_text(text)
    if complete:
        (path / "state.json").write_text("{}")
    return path


def test_swap_dir_replaces_the_folder_and_removes_the_old_one(tmp_path):
    target = _folder(tmp_path / "ckpt", "old")
    swap_dir(_folder(tmp_path / "ckpt.new", "new"), target)
    assert (target / "data").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]


@pytest.mark.parametrize("state, expect", [
    ("writing the new one", "old"),          # ckpt + partial ckpt.new
    ("between the renames", "new"),          # ckpt.old + complete ckpt.new
    ("new moved in, old not yet removed", "new"),  # ckpt (new) + ckpt.old
    ("first checkpoint half written", None),  # partial ckpt.new only
])
def test_settle_leaves_one_whole_checkpoint_after_a_crash_at_any_point(tmp_path, state, expect):
    target = tmp_path / "ckpt"
    if state == "writing the new one":
        _folder(target, "old"), _folder(tmp_path / "ckpt.new", "new", complete=False)
    elif state == "between the renames":
        _folder(tmp_path / "ckpt.old", "old"), _folder(tmp_path / "ckpt.new", "new")
    elif state == "new moved in, old not yet removed":
        _folder(target, "new"), _folder(tmp_path / "ckpt.old", "old")
    else:
        _folder(tmp_path / "ckpt.new", "new", complete=False)
    settle(target)
    if expect is None:
        assert not target.exists()
    else:
        assert (target / "data").read_text() == expect and (target / "state.json").is_file()
        assert not (tmp_path / "ckpt.old").exists()


def test_settle_dir_without_a_complete_new_one_brings_the_old_one_back(tmp_path):
    _folder(tmp_path / "m.old", "old")
    _folder(tmp_path / "m.new", "new", complete=False)
    settle_dir(tmp_path / "m", complete=lambda p: (p / "state.json").is_file())
    assert (tmp_path / "m" / "data").read_text() == "old"
