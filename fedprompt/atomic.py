"""Atomic file writes: a reader (or a restarted process) sees the old file or the new one,
never a torn mix.

The data go to a temporary file in the same folder, which is flushed and ``fsync``-ed,
then renamed over the target with :func:`os.replace` (atomic on POSIX and Windows), and
the folder is ``fsync``-ed so the rename itself survives a power cut.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` atomically (the folder must exist)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    _fsync_folder(path.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text`` (UTF-8) atomically (the folder must exist)."""
    atomic_write_bytes(path, text.encode("utf-8"))


def replace_folder(target: str | Path, fill: Callable[[Path], None]) -> Path:
    """Give the folder ``target`` new contents as one unit: ``fill`` writes them into a
    fresh folder beside it, which is then swapped in. A reader sees the old complete folder
    or the new complete one; if ``fill`` fails, ``target`` is untouched. (Between the two
    renames of the swap a crash leaves the old folder as ``.<name>.*.old``, recoverable.)"""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    new = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".new"))
    old: Path | None = None
    try:
        fill(new)
        for item in new.iterdir():
            if item.is_file():
                with item.open("rb") as handle:
                    os.fsync(handle.fileno())
        _fsync_folder(new)
        if target.exists():
            old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.",
                                        suffix=".old"))
            os.replace(target, old / target.name)
        os.replace(new, target)
    except BaseException:
        shutil.rmtree(new, ignore_errors=True)
        if old is not None and not target.exists() and (old / target.name).exists():
            os.replace(old / target.name, target)  # put the previous folder back
        raise
    finally:
        if old is not None and target.exists():
            shutil.rmtree(old, ignore_errors=True)
    _fsync_folder(target.parent)
    return target


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":  # folders cannot be opened for fsync on Windows
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
