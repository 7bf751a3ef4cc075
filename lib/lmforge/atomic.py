"""Atomic writes: a reader sees the old file or the new one, never a torn one.

Everything is written to a temporary sibling (same directory, so the same filesystem),
flushed and fsynced, then moved into place with os.replace.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def atomic_path(target: str | Path, *, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to `target`; on success rename it onto `target`.

    Works for files and directories. On an exception the temporary path is removed and
    `target` is left untouched.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", suffix=suffix, dir=target.parent))
    # mkdtemp reserved the name; the caller decides whether it becomes a file or a dir.
    tmp.rmdir()
    try:
        yield tmp
        replace(tmp, target)
    except BaseException:
        remove(tmp)
        raise


def replace(src: Path, target: Path) -> None:
    """Move `src` onto `target`. A directory target is swapped out, then deleted."""
    src, target = Path(src), Path(target)
    # Data reaches the disk before the rename that makes it visible, so a power cut cannot
    # leave a renamed-in but empty file.
    for f in [src] if src.is_file() else sorted(p for p in src.rglob("*") if p.is_file()):
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
    if src.is_dir():
        for d in [src, *sorted(p for p in src.rglob("*") if p.is_dir())]:
            _fsync_dir(d)
    if target.is_dir() and not target.is_symlink():
        trash = target.with_name(f".{target.name}.old-{os.getpid()}")
        os.replace(target, trash)
        os.replace(src, target)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(src, target)
    _fsync_dir(target.parent)


def remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def write_bytes(target: str | Path, data: bytes) -> None:
    with atomic_path(target) as tmp:
        tmp.write_bytes(data)


def write_text(target: str | Path, text: str) -> None:
    write_bytes(target, text.encode("utf-8"))
