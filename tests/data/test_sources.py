"""Source readers: every format, and bad input named by file and line."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.config import build
from lmforge.data.normalize import normalize
from lmforge.data.sources import SourceConfig, read_source
from lmforge.errors import ConfigError, InputError


def src(**kw) -> SourceConfig:
    return build(SourceConfig, {"name": "s", "share": 1.0, "licence": "CC0", **kw}, "mix.sources[0]")


def test_jsonl_gz_parquet_text_and_hub_dir(tmp_path: Path) -> None:
    rows = [{"id": f"d{i}", "text": f"document {i}"} for i in range(3)]
    gz = tmp_path / "a.jsonl.gz"
    gz.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode()))
    assert [d.id for d in read_source(src(path=str(gz)))] == ["s/d0", "s/d1", "s/d2"]
    pq.write_table(pa.table({"id": ["x", "y"], "body": ["one", "two"]}), tmp_path / "b.parquet")
    docs = read_source(src(path=str(tmp_path / "b.parquet"), text_field="body"))
    assert [(d.id, d.text) for d in docs] == [("s/x", "one"), ("s/y", "two")]
    tdir = tmp_path / "texts"
    (tdir / "sub").mkdir(parents=True)
    (tdir / "sub" / "z.txt").write_text("zed")
    (tdir / "a.txt").write_text("ay")
    assert [d.id for d in read_source(src(path=str(tdir)))] == ["s/a.txt", "s/sub/z.txt"]
    # a Hub id goes through datasets.load_dataset(..., streaming=True); a local dataset dir
    # takes the same path offline
    hub = tmp_path / "hubds"
    hub.mkdir()
    (hub / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    docs = read_source(src(hub=str(hub), max_docs=2))
    assert [d.text for d in docs] == ["document 0", "document 1"]


@pytest.mark.parametrize(
    ("content", "line", "needle"),
    [
        (b'{"text": "ok"}\n{"text": "broken\n', 2, "malformed JSON"),
        (b'{"text": "ok"}\n{"id": 1}\n', 2, "missing field 'text'"),
        (b'{"text": "ok"}\n\n{"text": 5}\n', 3, "must be a string"),
        (b'{"text": "ok"}\n{"text": "caf\xe9"}\n', 2, "not UTF-8"),
        (b'["a list"]\n', 1, "expected a JSON object"),
        (b'{"id": "a", "text": "x"}\n{"id": "a", "text": "y"}\n', 2, "duplicate id"),
    ],
)
def test_bad_jsonl_names_file_and_line(tmp_path: Path, content: bytes, line: int, needle: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_bytes(content)
    with pytest.raises(InputError) as e:
        read_source(src(path=str(f)))
    assert e.value.line == line
    assert f"{f}:{line}" in str(e.value) and needle in str(e.value)


def test_empty_and_missing_sources(tmp_path: Path) -> None:
    f = tmp_path / "empty.jsonl"
    f.write_text("\n")
    with pytest.raises(InputError, match="no documents"):
        read_source(src(path=str(f)))
    with pytest.raises(InputError, match="source not found"):
        read_source(src(path=str(tmp_path / "nope.jsonl")))


def test_source_needs_exactly_one_location() -> None:
    with pytest.raises(ConfigError, match="exactly one of 'path'"):
        src(path="a.jsonl", hub="org/ds")
    with pytest.raises(ConfigError, match="must be lowercase"):
        src(name="Bad Name", path="a.jsonl")


def test_normalize() -> None:
    raw = "\ufeffCafe\u0301 \r\nline  \n\n\n\n\nnext\x00\x9b\x85    indented code\u2028end\n"
    assert normalize(raw) == "Café\nline\n\nnext\n    indented code\nend"


def test_parquet_dir_without_ids_and_bad_unicode_and_corrupt_gzip(tmp_path: Path) -> None:
    d = tmp_path / "pq"
    d.mkdir()
    for name in ("a", "b"):
        pq.write_table(pa.table({"text": [f"{name} one", f"{name} two"]}), d / f"{name}.parquet")
    assert [x.id for x in read_source(src(path=str(d)))] == ["s/a.parquet#1", "s/a.parquet#2",
                                                             "s/b.parquet#1", "s/b.parquet#2"]
    lone = tmp_path / "lone.jsonl"
    lone.write_text('{"text": "ok"}\n{"text": "bad \\ud800 surrogate"}\n')
    with pytest.raises(InputError, match=r"lone.jsonl:2: field 'text' is not valid Unicode"):
        read_source(src(path=str(lone)))
    gz = tmp_path / "c.jsonl.gz"
    body = bytearray(gzip.compress(b"".join(b'{"text": "document %d"}\n' % i for i in range(2000))))
    body[40:100] = bytes(60)
    gz.write_bytes(bytes(body))
    with pytest.raises(InputError, match=r"c.jsonl.gz: cannot read: .* \(fix: the file is damaged"):
        read_source(src(path=str(gz)))
