"""One JSON object read from a file, or an InputError naming the file, the line and the fix."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..errors import InputError


def read_object(path: str | Path, *, missing: str, invalid: str) -> dict[str, Any]:
    """The object in `path`; `missing` / `invalid` are the fixes to print when it is absent or bad."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "not found", fix=missing) from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON: {e.msg}", line=e.lineno, fix=invalid) from None
    except UnicodeDecodeError:
        raise InputError(path, "not UTF-8", fix=invalid) from None
    if not isinstance(data, dict):
        raise InputError(path, "not a JSON object", fix=invalid)
    return data
