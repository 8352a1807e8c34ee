"""Crash-safe file writes, used by everything that writes state a reader or a later run relies on (bank manifest,
data files, checkpoints, bench results, the converted model).

A file is written to a temporary file in the same folder, fsynced, then moved over the target with ``os.replace``:
a reader sees the old file or the complete new one. A folder (a checkpoint, a converted model) is swapped by
renames: the old one is moved aside, the new one moved in, the old one removed; :func:`settle_dir` finishes a swap
a crash interrupted.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator


def fsync_dir(path: Path) -> None:
    """Make a folder's entries (a rename into it) durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every folder, ``root`` included."""
    for p in sorted(Path(root).rglob("*")):
        if p.is_file():
            with open(p, "rb") as fh:
                os.fsync(fh.fileno())
    for d in [*(p for p in Path(root).rglob("*") if p.is_dir()), Path(root)]:
        fsync_dir(d)


@contextmanager
def atomic_path(path: str | os.PathLike, mode: int | None = None) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name (a GGUF writer); when the block ends
    without an error the file is fsynced and moved over ``path``, else removed.

    Missing parent folders are created. The file keeps the permissions of the one it replaces (``mode`` for a new
    file, default 0o644).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = target.stat().st_mode & 0o777
    except OSError:
        mode = 0o644 if mode is None else mode
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield Path(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike, data: str | bytes, mode: int | None = None) -> None:
    """Replace ``path`` with ``data`` (text is written as UTF-8) so that no reader sees a partial file."""
    with atomic_path(path, mode) as tmp:
        tmp.write_bytes(data.encode("utf-8") if isinstance(data, str) else data)


def _aside(target: Path) -> Path:
    return target.with_name(target.name + ".old")


def swap_dir(new: Path, target: Path) -> None:
    """Make the complete folder ``new`` (a sibling of ``target``) become ``target``: move the old ``target`` aside,
    move ``new`` in, remove the old one. A crash between the two renames leaves ``new`` and the old folder;
    :func:`settle_dir` then finishes the swap."""
    new, target = Path(new), Path(target)
    old = _aside(target)
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    fsync_dir(target.parent)
    shutil.rmtree(old, ignore_errors=True)


def settle_dir(target: Path, complete: Callable[[Path], bool]) -> Path:
    """Leave ``target`` whole after a crash during :func:`swap_dir`: if it is missing, the new folder (when
    ``complete(new)``) or else the old one takes its place; leftovers beside a present ``target`` are removed."""
    target = Path(target)
    new, old = target.with_name(target.name + ".new"), _aside(target)
    if not target.exists():
        if new.is_dir() and complete(new):
            os.replace(new, target)
        elif old.is_dir():
            os.replace(old, target)
    if target.exists() and old.exists():
        shutil.rmtree(old, ignore_errors=True)
    return target
