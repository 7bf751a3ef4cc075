"""Where and with what code a stage runs: code version, software environment, device."""

from __future__ import annotations

import importlib.metadata as md
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def code_version(root: str | Path) -> dict[str, Any]:
    """Git commit and dirty flag of the checkout at `root` (commit None outside git).

    Untracked files count as dirty only when git does not ignore them, so stage outputs
    (which DVC lists in .gitignore) do not make every run look dirty.
    """
    root = Path(root)
    commit = _git(root, "rev-parse", "HEAD")
    if commit is None:
        return {"commit": None, "dirty": None}
    status = _git(root, "status", "--porcelain", "--untracked-files=normal")
    return {"commit": commit, "dirty": bool(status)}


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
        "device": device(),
    }
