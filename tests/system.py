"""System programs some tests drive (Debian packages, not Python ones): CI must have them (.ci/run
installs them), elsewhere the test that needs one is skipped."""

from __future__ import annotations

import os
import shutil

import pytest


def require(*names: str, package: str) -> str:
    """The path of the first of `names` on PATH; else fail under CI, skip elsewhere."""
    for name in names:
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail(f"{names[0]} is not installed: .ci/run installs it (apt-get install {package})")
    pytest.skip(f"{names[0]} is not installed (apt-get install {package})")
