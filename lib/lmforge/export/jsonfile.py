"""One JSON object read from a file, or an InputError naming the file, the line and the fix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..inputs import read_json_object


def read_object(path: str | Path, *, missing: str, invalid: str, limit: int | None = None) -> dict[str, Any]:
    """The object in `path`; `missing` / `invalid` are the fixes to print when it is absent or bad
    (lmforge.inputs.read_json_object: not UTF-8, empty, over `limit`, not JSON, not an object)."""
    return read_json_object(path, fix=invalid, missing=missing, limit=limit)
