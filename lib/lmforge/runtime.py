"""Where and with what code a stage runs: code version, software environment, device."""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def _git(root: Path, *args: str, strip: bool = True) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() if strip else out.stdout


# Files a pipeline run rewrites itself: a change to them says nothing about the code.
_RUN_WRITTEN = ("dvc.lock", ".gitignore")


def commit_time(root: str | Path) -> str | None:
    """The committer time of HEAD (ISO 8601), or None outside git."""
    return _git(Path(root), "log", "-1", "--format=%cI") or None


def code_version(root: str | Path) -> dict[str, Any]:
    """Git commit, dirty flag and, when dirty, a digest of the uncommitted changes.

    dvc.lock and the .gitignore files DVC maintains are left out (the run itself rewrites
    them), as are files git ignores (stage outputs). Outside git the commit is None.
    """
    root = Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    # not stripped: porcelain's leading space is part of the two-letter status
    status = _git(root, "status", "--porcelain", "-z", "--untracked-files=all", strip=False) or ""
    entries = iter(status.split("\0"))
    changed = []
    for entry in entries:
        if len(entry) < 4:
            continue
        if entry[0] in "RC":  # a rename or copy is followed by its source path: skip that entry
            next(entries, None)
        if Path(entry[3:]).name not in _RUN_WRITTEN:
            changed.append(entry[3:])
    changed.sort()
    if not changed:
        return {"commit": commit, "dirty": False}
    # What is uncommitted, as content: the same edits give the same digest on any machine.
    h = hashlib.sha256()
    for rel in changed:
        path = root / rel
        h.update(rel.encode() + b"\0")
        h.update(path.read_bytes() if path.is_file() else b"<deleted>")
    return {"commit": commit, "dirty": True, "changes_sha256": h.hexdigest(), "changed_files": len(changed)}


def _version(dist: str) -> str | None:
    try:
        return md.version(dist)
    except md.PackageNotFoundError:
        return None


def device() -> str:
    """The accelerator this process computes on: 'cpu' unless torch was loaded and sees CUDA.

    Stages that never import torch compute on the CPU; importing torch here just to ask
    would cost each such stage a second or two.
    """
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return "cpu"


def environment() -> dict[str, Any]:
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "host": socket.gethostname(),
        "torch": _version("torch"),
        "lmforge": _version("lmforge"),
        # what the bytes of data artifacts also depend on
        "packages": {d: _version(d) for d in ("numpy", "pyarrow", "tokenizers", "tiktoken", "rensa", "dvc", "mlflow")},
        "device": device(),
    }
