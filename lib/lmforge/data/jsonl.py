"""One reader for jsonl (optionally gzipped) with errors that name the file and line.

Used by the mix stage's sources and by `lmforge dedup`, so a bad line reads the same
everywhere: not UTF-8, malformed JSON, not an object, a missing or non-string text field.
Blank lines are skipped (they carry no record); a line over `lmforge.inputs.MAX_JSONL_LINE_BYTES`
is refused.
"""

from __future__ import annotations

import gzip
import json
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .. import inputs
from ..errors import InputError


def records(path: Path) -> Iterator[tuple[int, bytes, dict[str, Any]]]:
    """(1-based line number, raw line with its terminator, parsed object) for each record.

    A line longer than `inputs.MAX_JSONL_LINE_BYTES` is refused before more of it is read, so
    a binary file or one giant record fails with its line number instead of exhausting memory.
    """
    limit = inputs.MAX_JSONL_LINE_BYTES
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as fh:
            n = 0
            while raw := fh.readline(limit + 1):
                n += 1
                if len(raw) > limit:
                    raise InputError(path, f"line is longer than the {inputs.size_text(limit)} limit for one record",
                                     line=n, fix="split the record, or check that the file is jsonl "
                                     "(one JSON object per line)")
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise InputError(path, f"not UTF-8 ({e.reason} at byte {e.start} of the line)", line=n,
                                     fix="re-encode the file as UTF-8") from None
                if not line.strip():
                    continue
                try:  # without its terminator, so an unclosed record reports this line's column, not "line 2"
                    rec = json.loads(line.rstrip("\r\n"))
                except json.JSONDecodeError as e:
                    raise InputError(path, f"malformed JSON: {e.msg.removesuffix(' at')} at column {e.colno}", line=n,
                                     fix="one JSON object per line") from None
                if not isinstance(rec, dict):
                    raise InputError(path, f"expected a JSON object, got {type(rec).__name__}", line=n,
                                     fix='write {"text": "..."}')
                yield n, raw, rec
    except IsADirectoryError:
        raise InputError(path, "is a directory, not a jsonl file", fix="point at a .jsonl or .jsonl.gz file") from None
    except (OSError, EOFError, zlib.error) as e:  # gzip: truncated, corrupt, or not gzip at all
        if isinstance(e, FileNotFoundError):
            raise InputError(path, "file not found", fix="check the path") from None
        raise InputError(path, f"cannot read: {e}",
                         fix="the file is damaged, truncated or not what its name says (a .gz must be one "
                         "whole gzip stream): re-create or re-download it") from None


def text_of(rec: dict[str, Any], field: str, path: Path | str, line: int, fix: str = "") -> str:
    """The record's text field, or an InputError saying what is wrong with it."""
    if field not in rec:
        raise InputError(path, f"missing field '{field}'", line=line, fix=fix or f'every record needs "{field}": "<string>"')
    value = rec[field]
    if not isinstance(value, str):
        raise InputError(path, f"field '{field}' must be a string, got {type(value).__name__}", line=line,
                         fix=f'write "{field}": "<string>"')
    return valid_unicode(value, f"field '{field}'", path, line)


def valid_unicode(value: str, what: str, path: Path | str, line: int) -> str:
    """JSON's \\ud800-style escapes can smuggle lone surrogates past UTF-8 decoding; refuse them here
    rather than crash later when the text is encoded."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(path, f"{what} is not valid Unicode (lone surrogate {value[e.start]!r} at "
                         f"character {e.start})", line=line, fix="fix the \\u escape in the file") from None
    return value
