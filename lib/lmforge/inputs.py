"""Size limits and the JSON reader shared by every loader of a file handed to lmforge.

    from lmforge import inputs
    meta = inputs.read_json_object(path, fix="re-run the stage that wrote it")

The limits live here, named, so that a huge input is refused with one clear message before it
is read (never an out-of-memory kill half way through a stage), and so that docs/bad-input.md
and the code quote the same numbers. They are far above anything lmforge writes or reads in
normal use; an input over one is a wrong file, a file that is not in the format it claims (a
binary named .jsonl has no newlines, so its one "line" is the whole file), or an attack.

A file's total size is deliberately not capped where it streams: a jsonl corpus is read a line
at a time, so only the line is bounded; the mix keeps documents in memory, and a source's
`max_docs` is the knob for that.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from .errors import InputError

MiB = 1 << 20
# One line of a jsonl input (a document, a conversation, a preference pair, a fact). The longest
# documents the mix keeps by default are 100,000 characters (filters.max_chars): 16 MiB is 40x
# that in the worst UTF-8 case.
MAX_JSONL_LINE_BYTES = 16 * MiB
# One JSON metadata file: a sources manifest, a model's config.json, a checkpoint's state, a
# delta's manifest. lmforge writes these at a few KiB to a few hundred KiB.
MAX_JSON_BYTES = 16 * MiB
# params.yaml, dvc.yaml, a profile: hand-written, a few KiB.
MAX_YAML_BYTES = 4 * MiB
# tokenizer.json: ~100 KiB at lmforge's 2k vocabulary, tens of MiB for 128k-256k vocabularies.
MAX_TOKENIZER_BYTES = 256 * MiB
# One line (one record) of the audit log, audit/log.jsonl. A record holds digests and short
# values, never file contents: the largest a tiny-profile run writes are ~3 KiB (a stage with its
# inputs, outputs and decisions), so 1 MiB leaves room for thousands of outputs. lmforge refuses
# to append a record over it, so a longer line was not written by lmforge.
MAX_AUDIT_LINE_BYTES = 1 * MiB


def size_text(n: int) -> str:
    """A byte count for messages: whole MiB as such (the limits), anything else exactly."""
    return f"{n // MiB} MiB" if n and n % MiB == 0 else f"{n:,} bytes"


def check_size(path: Path, limit: int, what: str, fix: str) -> None:
    """Refuse `path` (an InputError) when it is bigger than `limit` bytes; nothing is read."""
    size = path.stat().st_size
    if size > limit:
        raise InputError(path, f"is {size_text(size)}, over the {size_text(limit)} limit for {what}", fix=fix)


def read_json(path: str | Path, *, fix: str, missing: str | None = None, limit: int | None = None) -> Any:
    """The JSON value in `path`, or an InputError naming the file (and line, where there is
    one) with `fix` (`missing` when the file does not exist): not found, a directory, over
    `limit` (default MAX_JSON_BYTES), not UTF-8, empty, or not JSON."""
    path = Path(path)
    if path.is_dir():
        raise InputError(path, "is a directory, not a JSON file", fix=missing or fix)
    try:
        check_size(path, MAX_JSON_BYTES if limit is None else limit, "a JSON file", fix)
        data = path.read_bytes()
    except FileNotFoundError:
        raise InputError(path, "not found", fix=missing or fix) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise InputError(path, f"not UTF-8 ({e.reason} at byte {e.start})", line=data[:e.start].count(b"\n") + 1,
                         fix=fix) from None
    if not text.strip():
        raise InputError(path, "is empty", fix=fix)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        # "Unterminated string starting at" ends in "at": say the column once
        raise InputError(path, f"invalid JSON: {e.msg.removesuffix(' at')} at column {e.colno}", line=e.lineno,
                         fix=fix) from None


def read_json_object(path: str | Path, *, fix: str, missing: str | None = None,
                     limit: int | None = None) -> dict[str, Any]:
    """`read_json`, and the value must be an object."""
    value = read_json(path, fix=fix, missing=missing, limit=limit)
    if not isinstance(value, dict):
        raise InputError(path, f"expected a JSON object, got {type(value).__name__}", fix=fix)
    return value
