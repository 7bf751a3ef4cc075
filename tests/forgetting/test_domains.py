"""Token splits cut by mix source: the benchmark's domains and the retention table's rows."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lmforge.errors import InputError
from lmforge.forgetting.domains import source_splits
from lmforge.tokens import write_index, write_split

DOCS = [("a0", "drama", "to be"), ("b0", "code", "def f(): pass"), ("a1", "drama", "or not"),
        ("c0", "math", "1 + 1 = 2")]


def _mix_and_tokens(tmp_path: Path, docs: list[tuple[str, str, str]]) -> tuple[Path, Path]:
    mix, tokens = tmp_path / "mix", tmp_path / "tokens"
    (mix / "val").mkdir(parents=True)
    tokens.mkdir()
    pq.write_table(pa.table({k: [d[i] for d in docs] for i, k in enumerate(("id", "source", "text"))}),
                   mix / "val" / "part-00000.parquet")
    stats = write_split([mix / "val" / "part-00000.parquet"], tokens, "val", bos_id=0, dtype="uint16",
                        encode=lambda texts: [np.frombuffer(t.encode(), dtype=np.uint8).astype(np.uint16) + 1
                                              for t in texts])
    write_index(tokens, dtype="uint16", vocab_size=257, bos_id=0, splits={"val": stats})
    return mix, tokens


def test_documents_go_to_their_source_in_order(tmp_path: Path) -> None:
    mix, tokens = _mix_and_tokens(tmp_path, DOCS)
    splits = source_splits(tokens, mix, "val")
    assert list(splits) == ["code", "drama", "math"]
    drama = splits["drama"]
    assert drama.index["n_docs"] == 2 and drama.bos_id == 0
    texts = [bytes((drama.doc(i)[1:] - 1).astype(np.uint8)).decode() for i in range(2)]
    assert texts == ["to be", "or not"]
    assert list(source_splits(tokens, mix, "val", ["math", "code"])) == ["math", "code"]


def test_missing_source_and_mismatched_shards_are_named(tmp_path: Path) -> None:
    mix, tokens = _mix_and_tokens(tmp_path, DOCS)
    with pytest.raises(InputError, match=r"no 'val' documents of source\(s\) kjv \(the mix has code, drama, math\)"):
        source_splits(tokens, mix, "val", ["kjv"])
    pq.write_table(pa.table({k: [d[i] for d in DOCS[:3]] for i, k in enumerate(("id", "source", "text"))}),
                   mix / "val" / "part-00000.parquet")  # the mix changed, the tokens did not
    with pytest.raises(InputError, match=r"token shards hold 4 documents but the mix's 'val' split has 3.*re-run the tokenizer"):
        source_splits(tokens, mix, "val")
