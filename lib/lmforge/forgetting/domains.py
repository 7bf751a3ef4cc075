"""Token splits per mix source: the domains of the continual benchmark and the rows of the
retention table.

The tokenizer stage writes the documents of a mix split in the mix's order, one token document
per parquet row, so the mix's `source` column names the source of every token document. Only
that column is read; nothing is encoded again.

    by_source = source_splits(tokens_dir, mix_dir, "val")   # {"kjv": TokenSplit, ...}
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ..errors import InputError
from ..tokens import TokenSplit, open_split, split_files


def doc_sources(mix_dir: Path, split: str) -> np.ndarray:
    """The source of every document of the mix's `split`, in the token shards' order."""
    parts = []
    for path in split_files(mix_dir, split):
        try:
            column = pq.read_table(path, columns=["source"]).column("source")
        except (OSError, pa.ArrowInvalid, KeyError) as e:
            raise InputError(path, f"cannot read the 'source' column ({e})", fix="re-run the mix stage") from None
        parts.append(np.asarray(column.to_pylist(), dtype=object))
    return np.concatenate(parts) if parts else np.zeros(0, dtype=object)


def take_docs(split: TokenSplit, docs: np.ndarray) -> TokenSplit:
    """A split of the documents `docs` (indices, in that order) of `split`, in memory."""
    starts, ends = split.offsets[docs], split.offsets[docs + 1]
    lengths = (ends - starts).astype(np.int64)
    tokens = (np.concatenate([np.asarray(split.tokens[s:e]) for s, e in zip(starts, ends, strict=True)])
              if len(docs) else np.zeros(0, dtype=split.tokens.dtype))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    return TokenSplit(tokens=tokens, offsets=offsets, index={"n_docs": len(docs), "n_tokens": len(tokens)},
                      bos_id=split.bos_id)


def source_splits(tokens_dir: str | Path, mix_dir: str | Path, split: str,
                  sources: list[str] | None = None) -> dict[str, TokenSplit]:
    """`split` of the token shards cut by mix source (all sources, or `sources` in that order)."""
    tokens = open_split(tokens_dir, split)
    names = doc_sources(Path(mix_dir), split)
    if len(names) != len(tokens.offsets) - 1:
        raise InputError(Path(tokens_dir) / "index.json",
                         f"the '{split}' token shards hold {len(tokens.offsets) - 1} documents but the mix's "
                         f"'{split}' split has {len(names)}", fix="re-run the tokenizer stage on this mix")
    present = sorted(set(names.tolist()))
    wanted = present if sources is None else sources
    if missing := [s for s in wanted if s not in present]:
        raise InputError(Path(mix_dir) / split, f"no '{split}' documents of source(s) {', '.join(missing)} "
                         f"(the mix has {', '.join(present)})", fix="name sources from params.yaml: mix.sources")
    return {s: take_docs(tokens, np.flatnonzero(names == s)) for s in wanted}
