"""Reading raw sources into documents: local jsonl(.gz), parquet, text, or a Hub dataset.

Every malformed record is an InputError naming the file and line; nothing is skipped
silently. Document ids are made global by prefixing the source name ("sotu/sotu-12").

A local source file listed in a `manifest.json` beside it (data/sources/manifest.json, written
by scripts/build_sources.py) must have the SHA-256 the manifest gives it: the model card quotes
those digests as what the model was trained on, so a file changed behind the manifest's back is
refused rather than misreported.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import field_validator, model_validator

from ..config import Config
from ..digest import sha256_file
from ..errors import InputError
from ..inputs import read_json_object
from . import jsonl

_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
MANIFEST = "manifest.json"
_MANIFEST_FIX = "rebuild the sources and their manifest (python scripts/build_sources.py), or fix the entry"


class SourceConfig(Config):
    """One source of the mix. Exactly one of `path` (local) or `hub` (a Hub dataset id)."""

    name: str
    path: str | None = None
    hub: str | None = None
    hub_config: str | None = None
    hub_split: str = "train"
    hub_revision: str | None = None  # a commit sha pins a Hub dataset; without it upstream edits leak in
    format: Literal["jsonl", "parquet", "text"] | None = None  # None: inferred from `path`
    text_field: str = "text"
    id_field: str | None = "id"
    share: float
    licence: str
    max_docs: int | None = None

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v):
            raise ValueError("must be lowercase letters, digits and '_', starting with a letter")
        return v

    @field_validator("max_docs")
    @classmethod
    def _max_docs(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be at least 1 (or null for no cap)")
        return v

    @field_validator("share")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0 < v <= 1:
            raise ValueError("must be in (0, 1]")
        return v

    @model_validator(mode="after")
    def _one_location(self) -> SourceConfig:
        if (self.path is None) == (self.hub is None):
            raise ValueError(f"source '{self.name}': give exactly one of 'path' (local) or 'hub' (dataset id)")
        return self

    def resolved_format(self) -> str:
        if self.format:
            return self.format
        assert self.path is not None
        p = self.path.lower()
        if p.endswith((".jsonl", ".jsonl.gz", ".json", ".json.gz")):
            return "jsonl"
        if p.endswith(".parquet") or (Path(self.path).is_dir() and any(Path(self.path).glob("*.parquet"))):
            return "parquet"
        return "text"


@dataclass(frozen=True)
class Document:
    id: str
    source: str
    text: str


def _check_text(rec: dict[str, Any], src: SourceConfig, path: Path, line: int) -> str:
    return jsonl.text_of(rec, src.text_field, path, line,
                         fix=f"add it, or set text_field for source '{src.name}' in params.yaml")


# Each reader yields (file, line, id or None, text); "line" is the row number for parquet and
# the file's ordinal for a text directory, 1-based.
Row = tuple[Path, int, "str | None", str]


def _id(value: object, path: Path, line: int) -> str | None:
    return None if value is None else jsonl.valid_unicode(str(value), "id", path, line)


def _read_jsonl(src: SourceConfig, path: Path) -> Iterator[Row]:
    for n, _raw, rec in jsonl.records(path):
        rid = _id(rec.get(src.id_field), path, n) if src.id_field else None
        yield path, n, rid, _check_text(rec, src, path, n)


def _read_parquet(src: SourceConfig, path: Path) -> Iterator[Row]:
    import pyarrow.parquet as pq

    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    for f in files:
        try:
            table = pq.read_table(f)
        except Exception as e:  # pyarrow raises several types for a bad file
            raise InputError(f, f"not a readable parquet file: {e}") from None
        if src.text_field not in table.column_names:
            raise InputError(f, f"no column '{src.text_field}' (columns: {table.column_names})",
                             fix=f"set text_field for source '{src.name}' in params.yaml")
        texts = table.column(src.text_field).to_pylist()
        has_ids = src.id_field is not None and src.id_field in table.column_names
        ids = table.column(src.id_field).to_pylist() if has_ids else [None] * len(texts)
        for i, (rid, text) in enumerate(zip(ids, texts, strict=True), start=1):
            yield f, i, _id(rid, f, i), _check_text({src.text_field: text}, src, f, i)


def _read_text(src: SourceConfig, path: Path) -> Iterator[Row]:
    files = sorted(p for p in path.rglob("*.txt")) if path.is_dir() else [path]
    for i, f in enumerate(files, start=1):
        data = f.read_bytes()
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            raise InputError(f, "not UTF-8", line=data[: e.start].count(b"\n") + 1,
                             fix="re-encode the file as UTF-8") from None
        yield f, i, (f.relative_to(path).as_posix() if path.is_dir() else f.name), text


def _read_hub(src: SourceConfig) -> Iterator[Row]:
    import datasets

    where = Path(f"hub:{src.hub}")
    try:
        ds = datasets.load_dataset(src.hub, name=src.hub_config, split=src.hub_split, streaming=True,
                                   revision=src.hub_revision)
        for i, rec in enumerate(ds, start=1):
            rid = _id(rec.get(src.id_field), where, i) if src.id_field else None
            yield where, i, rid, _check_text(dict(rec), src, where, i)
    except InputError:
        raise
    except Exception as e:  # datasets raises many types (network, missing config, bad shard...)
        raise InputError(where, f"cannot stream dataset: {e}",
                         fix="check the id, config and revision, and network access (HF_HUB_OFFLINE)") from None


def listed_sha256(path: Path) -> str | None:
    """The SHA-256 that the manifest.json beside `path` gives the file, or None when there is no
    manifest or it does not list the file. Every entry is checked, not only this file's, so a
    damaged manifest is caught whichever source is read first."""
    manifest = path.parent / MANIFEST
    if not manifest.is_file():
        return None
    m = read_json_object(manifest, fix=_MANIFEST_FIX)
    if "sources" not in m:
        raise InputError(manifest, "key 'sources' is missing", fix=_MANIFEST_FIX)
    entries = m["sources"]
    if not isinstance(entries, dict):
        raise InputError(manifest, f"key 'sources' must be an object of name -> {{file, sha256}}, got "
                         f"{type(entries).__name__}", fix=_MANIFEST_FIX)
    found = None
    for name, entry in entries.items():
        if not isinstance(entry, dict):
            raise InputError(manifest, f"key 'sources.{name}' must be an object with 'file' and 'sha256', got "
                             f"{type(entry).__name__}", fix=_MANIFEST_FIX)
        for key in ("file", "sha256"):
            if key not in entry:
                raise InputError(manifest, f"key 'sources.{name}.{key}' is missing", fix=_MANIFEST_FIX)
        if not isinstance(entry["file"], str):
            raise InputError(manifest, f"key 'sources.{name}.file' must be a file name, got "
                             f"{type(entry['file']).__name__}", fix=_MANIFEST_FIX)
        if not isinstance(entry["sha256"], str) or not _SHA256.match(entry["sha256"]):
            raise InputError(manifest, f"key 'sources.{name}.sha256' must be 64 lowercase hex digits, got "
                             f"{entry['sha256']!r}", fix=_MANIFEST_FIX)
        if entry["file"] == path.name:
            found = entry["sha256"]
    return found


def check_listed(path: Path) -> None:
    """Refuse a source file whose bytes are not those its manifest lists (no manifest: no check)."""
    want = listed_sha256(path)
    if want is not None and (got := sha256_file(path)) != want:
        raise InputError(path, f"SHA-256 {got[:16]}... does not match {path.parent / MANIFEST}'s {want[:16]}...: "
                         "the file was changed or damaged after the manifest was written",
                         fix="restore the file (git checkout / dvc checkout), or rebuild the sources and their "
                         "manifest (python scripts/build_sources.py)")


def read_source(src: SourceConfig, root: Path = Path(".")) -> list[Document]:
    """All documents of one source, in file order (capped at `max_docs`).

    A record without an id gets `#<line>` (`<file>#<line>` in a directory of files), which
    cannot collide with another file's rows; ids are made global as `<source>/<id>`.
    """
    if src.hub is not None:
        rows = _read_hub(src)
        where: Path = Path(f"hub:{src.hub}")
    else:
        assert src.path is not None
        where = root / src.path
        if not where.exists():
            raise InputError(where, "source not found", fix=f"fix the path of source '{src.name}' in params.yaml")
        if where.is_file():  # a manifest lists files; a directory of shards or texts has no entry
            check_listed(where)
        fmt = src.resolved_format()
        rows = {"jsonl": _read_jsonl, "parquet": _read_parquet, "text": _read_text}[fmt](src, where)
    docs: list[Document] = []
    seen: dict[str, tuple[Path, int]] = {}
    for path, line, rid, text in rows:
        if rid is None:
            rid = f"{path.relative_to(where).as_posix()}#{line}" if where.is_dir() else f"#{line}"
        if rid in seen:
            first = seen[rid]
            raise InputError(path, f"duplicate id {rid!r} (first at {first[0]}:{first[1]})", line=line,
                             fix="make ids unique within the source, or set id_field: null")
        seen[rid] = (path, line)
        docs.append(Document(id=f"{src.name}/{rid}", source=src.name, text=text))
        if src.max_docs is not None and len(docs) >= src.max_docs:
            break
    if not docs:
        raise InputError(where, "source has no documents", fix=f"give source '{src.name}' some data or remove it")
    return docs
