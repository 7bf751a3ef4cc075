"""Token shards: read the mix split, write flat token arrays, read them back.

On-disk format of a `tokens/` directory (written by the `tokenizer` stage):

- `<split>.bin`: one flat little-endian array of token ids (`uint16` while the vocabulary fits,
  else `uint32`). Every document is written as `<|bos|>` followed by its tokens, so documents
  are BOS-separated and the file starts with BOS.
- `<split>.idx.npy`: int64 array of `n_docs + 1` offsets into `<split>.bin`; document `i` is
  `tokens[offsets[i]:offsets[i+1]]` (its BOS first). Written with `allow_pickle=False`.
- `index.json`: dtype, vocab size, BOS id and, per split, token/document/byte counts in total
  and per source.

Use from Python:

    from lmforge.tokens import open_split
    split = open_split("data/tokenizer/tokens", "train")   # memmap, no copy
    split.tokens[:1024], split.doc(0), split.index["n_docs"]

The writer streams: it holds one read batch of text and its ids at a time.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from .atomic import write_text
from .errors import InputError, LmforgeError

COLUMNS = ("id", "source", "text")
SPLITS = ("train", "val")
INDEX_FILE = "index.json"
FORMAT_VERSION = 1
# Rows per parquet read: big enough for the encoder's thread pool to stay busy, small enough
# that one batch of text plus its ids stays a few tens of MB.
READ_BATCH_ROWS = 2048


@dataclass(frozen=True)
class Docs:
    """One read batch of a split: parallel lists plus UTF-8 byte lengths."""

    ids: list[str]
    sources: list[str]
    texts: list[str]
    nbytes: np.ndarray


def split_files(mix_dir: Path, split: str) -> list[Path]:
    """The parquet shards of `split`, in sorted file order (the mix's final order)."""
    split_dir = Path(mix_dir) / split
    if not split_dir.is_dir():
        raise InputError(split_dir, f"the mix has no '{split}' directory",
                         fix="run the mix stage first, or point inputs['mix'] at its output directory")
    files = sorted(split_dir.glob("part-*.parquet"))
    if not files:
        raise InputError(split_dir, "no part-*.parquet shards found", fix="re-run the mix stage")
    return files


def _check_schema(path: Path, schema: pa.Schema) -> None:
    for name in COLUMNS:
        if name not in schema.names:
            raise InputError(path, f"column '{name}' is missing (has {', '.join(schema.names)})",
                             fix="the mix must write string columns id, source, text")
        kind = schema.field(name).type
        if kind not in (pa.string(), pa.large_string()):
            raise InputError(path, f"column '{name}' has type {kind}, expected string",
                             fix="the mix must write string columns id, source, text")


def iter_docs(files: Sequence[Path]) -> Iterator[Docs]:
    """Stream the documents of `files` in order, checking schema and nulls on the way."""
    for path in files:
        try:
            pfile = pq.ParquetFile(path)
        except (OSError, pa.ArrowInvalid) as e:
            raise InputError(path, f"not a readable parquet file ({e})", fix="re-run the mix stage") from None
        _check_schema(path, pfile.schema_arrow)
        row = 0
        for batch in pfile.iter_batches(batch_size=READ_BATCH_ROWS, columns=list(COLUMNS)):
            for name in COLUMNS:
                col = batch.column(name)
                if col.null_count:
                    first = row + int(pc.index(pc.is_null(col), True).as_py())
                    raise InputError(path, f"column '{name}' is null in row {first} (0-based)",
                                     fix="the mix must not write null id/source/text")
            text = batch.column("text")
            yield Docs(
                ids=batch.column("id").to_pylist(),
                sources=batch.column("source").to_pylist(),
                texts=text.to_pylist(),
                nbytes=pc.binary_length(text).to_numpy(zero_copy_only=False).astype(np.int64),
            )
            row += batch.num_rows


def iter_prefix(files: Sequence[Path], max_bytes: int | None) -> Iterator[list[str]]:
    """Batches of texts from the start of `files`, at most `max_bytes` UTF-8 bytes in all.

    Whole documents are taken while they fit; the first one that does not is cut at a
    character boundary to fill the budget exactly, so the prefix is the same on every run.
    """
    left = max_bytes
    for docs in iter_docs(files):
        if left is None:
            yield docs.texts
            continue
        ends = np.cumsum(docs.nbytes)
        fit = int(np.searchsorted(ends, left, side="right"))
        texts = docs.texts[:fit]
        if fit < len(docs.texts):
            used = int(ends[fit - 1]) if fit else 0
            cut = docs.texts[fit].encode("utf-8")[: left - used].decode("utf-8", errors="ignore")
            if cut:
                texts.append(cut)
            if texts:
                yield texts
            return
        left -= int(ends[-1]) if len(ends) else 0
        if texts:
            yield texts


@dataclass
class SplitStats:
    """Counts for one split; `tokens` include the one BOS per document."""

    n_tokens: int = 0
    n_docs: int = 0
    n_bytes: int = 0
    by_source: dict[str, dict[str, int]] = field(default_factory=dict)

    def add(self, source: str, n_text_tokens: int, n_bytes: int) -> None:
        self.n_tokens += n_text_tokens + 1
        self.n_docs += 1
        self.n_bytes += n_bytes
        row = self.by_source.setdefault(source, {"docs": 0, "text_tokens": 0, "bytes": 0})
        row["docs"] += 1
        row["text_tokens"] += n_text_tokens
        row["bytes"] += n_bytes

    def to_json(self) -> dict[str, Any]:
        return {
            "n_tokens": self.n_tokens,
            "n_docs": self.n_docs,
            "n_text_tokens": self.n_tokens - self.n_docs,
            "n_bytes": self.n_bytes,
            "by_source": {name: dict(self.by_source[name]) for name in sorted(self.by_source)},
        }


# ids per document: numpy arrays (what lmforge.tokenizer.corpus_encoder gives) or lists.
Ids = Sequence[np.ndarray] | Sequence[Sequence[int]]
Encode = Callable[[list[str]], Ids]
Check = Callable[[Docs, Ids], None]


def write_split(
    files: Sequence[Path],
    out_dir: Path,
    split: str,
    *,
    encode: Encode,
    bos_id: int,
    dtype: str,
    check: Check | None = None,
    progress: Callable[[int], None] | None = None,
) -> SplitStats:
    """Encode `files` into `out_dir/<split>.bin` and `<split>.idx.npy`; return the counts.

    `out_dir` should be a temporary directory that the caller renames into place (the stage
    does), so files here are written directly. `check(docs, ids)` may raise to reject a batch;
    `progress(n_bytes)` is called after each batch.
    """
    np_dtype = np.dtype(dtype).newbyteorder("<")
    limit = int(np.iinfo(np_dtype).max)
    bos = np.array([bos_id], dtype=np.uint32)
    stats = SplitStats()
    offsets: list[np.ndarray] = [np.zeros(1, dtype=np.int64)]
    with open(out_dir / f"{split}.bin", "wb") as fh:
        for docs in iter_docs(files):
            if not docs.texts:
                continue
            ids = encode(docs.texts)
            if check is not None:
                check(docs, ids)
            lengths = np.fromiter((len(x) + 1 for x in ids), dtype=np.int64, count=len(ids))
            # Concatenated in the encoder's own dtype (uint32 from tiktoken), narrowed once.
            arrays = [x if isinstance(x, np.ndarray) else np.asarray(x, dtype=np.int64) for x in ids]
            flat = np.concatenate([part for x in arrays for part in (bos, x)])
            # A wrong id would otherwise wrap silently when narrowed to uint16.
            if len(flat) and (int(flat.min()) < 0 or int(flat.max()) > limit):
                raise LmforgeError(f"{split}: token id outside 0..{limit} for dtype {dtype}; "
                                   "the shard dtype must hold the vocabulary (a bug: check vocab_size)")
            fh.write(memoryview(flat.astype(np_dtype, copy=False)))
            offsets.append(stats.n_tokens + np.cumsum(lengths))
            for source, x, n_bytes in zip(docs.sources, ids, docs.nbytes.tolist(), strict=True):
                stats.add(source, len(x), n_bytes)
            if progress is not None:
                progress(int(docs.nbytes.sum()))
    with open(out_dir / f"{split}.idx.npy", "wb") as fh:
        np.save(fh, np.concatenate(offsets), allow_pickle=False)
    return stats


def write_index(out_dir: Path, *, dtype: str, vocab_size: int, bos_id: int,
                splits: dict[str, SplitStats]) -> dict[str, Any]:
    index = {
        "format_version": FORMAT_VERSION,
        "dtype": dtype,
        "byteorder": "little",
        "vocab_size": vocab_size,
        "bos_id": bos_id,
        "splits": {
            name: {"bin": f"{name}.bin", "offsets": f"{name}.idx.npy", **splits[name].to_json()}
            for name in sorted(splits)
        },
    }
    write_text(out_dir / INDEX_FILE, json.dumps(index, indent=2, sort_keys=True) + "\n")
    return index


@dataclass(frozen=True)
class TokenSplit:
    """A split opened for reading: `tokens` is a read-only memmap."""

    tokens: np.ndarray
    offsets: np.ndarray
    index: dict[str, Any]
    bos_id: int

    def doc(self, i: int) -> np.ndarray:
        """Document `i`, its BOS first."""
        return self.tokens[self.offsets[i]: self.offsets[i + 1]]


def read_index(tokens_dir: str | Path) -> dict[str, Any]:
    path = Path(tokens_dir) / INDEX_FILE
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "not found", fix="run the tokenizer stage first") from None
    except json.JSONDecodeError as e:
        raise InputError(path, f"invalid JSON: {e.msg}", line=e.lineno, fix="re-run the tokenizer stage") from None
    if index.get("format_version") != FORMAT_VERSION:
        raise InputError(path, f"format_version {index.get('format_version')!r}, expected {FORMAT_VERSION}",
                         fix="re-run the tokenizer stage with this version of lmforge")
    return index


def open_split(tokens_dir: str | Path, split: str) -> TokenSplit:
    """Open `split` of a tokens directory without reading it into memory."""
    tokens_dir = Path(tokens_dir)
    index = read_index(tokens_dir)
    if split not in index["splits"]:
        raise InputError(tokens_dir / INDEX_FILE, f"no split '{split}' (has {', '.join(index['splits'])})")
    meta = index["splits"][split]
    dtype = np.dtype(index["dtype"]).newbyteorder("<")
    bin_path = tokens_dir / meta["bin"]
    if not bin_path.is_file() or bin_path.stat().st_size != meta["n_tokens"] * dtype.itemsize:
        raise InputError(bin_path, f"missing or not {meta['n_tokens']} tokens of {index['dtype']} as index.json says",
                         fix="re-run the tokenizer stage")
    offsets = np.load(tokens_dir / meta["offsets"], allow_pickle=False)
    if len(offsets) != meta["n_docs"] + 1 or (len(offsets) and int(offsets[-1]) != meta["n_tokens"]):
        raise InputError(tokens_dir / meta["offsets"], "offsets disagree with index.json",
                         fix="re-run the tokenizer stage")
    tokens = np.memmap(bin_path, dtype=dtype, mode="r") if meta["n_tokens"] else np.zeros(0, dtype)
    return TokenSplit(tokens=tokens, offsets=offsets, index=meta, bos_id=int(index["bos_id"]))
