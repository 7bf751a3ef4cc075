"""The `mix` stage: sources → normalised, filtered, deduplicated, mixed train/val shards.

    run(MixConfig, inputs, out_dir) -> metrics

Writes `out_dir/train/part-*.parquet` and `out_dir/val/part-*.parquet` (columns id,
source, text; rows in the final mixed order) and `out_dir/dropped.parquet` (every dropped
document with its reason). Order of blocks: read → normalise → quality filters → exact
dedup → near-dup (MinHash LSH) → train/val split by id hash → mix train to target shares.
Dedup runs across all sources and before the split, so no document has a twin across splits.
"""

from __future__ import annotations

import sys
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import xxhash
from pydantic import field_validator, model_validator

from ..config import StageConfig
from ..errors import LmforgeError
from . import mixing, schemas, shards
from .dedup import EXACT, DedupConfig, deduplicate
from .filters import REASONS, FilterConfig, reason_to_drop
from .mixing import MixingConfig
from .normalize import normalize
from .sources import Document, SourceConfig, read_source


class MixConfig(StageConfig):
    seed: int = 1337
    sources: list[SourceConfig]
    filters: FilterConfig = FilterConfig()
    dedup: DedupConfig = DedupConfig()
    mixing: MixingConfig = MixingConfig()
    val_fraction: float = 0.02
    val_max_docs_per_source: int = 200
    rows_per_shard: int = 20_000

    def input_paths(self) -> list[str]:
        """Local files this config makes the stage read (the caller checks they are declared deps)."""
        paths = [s.path for s in self.sources if s.path is not None]
        return paths + ([self.mixing.reference_tokenizer] if self.mixing.reference_tokenizer else [])

    @field_validator("val_max_docs_per_source", "rows_per_shard")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("val_fraction")
    @classmethod
    def _val(cls, v: float) -> float:
        if not 0 < v < 1:
            raise ValueError("must be in (0, 1)")
        return v

    @model_validator(mode="after")
    def _shares(self) -> MixConfig:
        names = [s.name for s in self.sources]
        if not names:
            raise ValueError("at least one source is needed")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"source names must be unique; repeated: {dup}")
        total = sum(s.share for s in self.sources)
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"source shares must sum to 1, they sum to {total:.6g}")
        return self


def _log(msg: str) -> None:
    print(f"[mix] {msg}", file=sys.stderr, flush=True)


def _id_hash(doc_id: str, seed: int) -> int:
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8"), seed=seed)


def _is_val(doc_id: str, seed: int, fraction: float) -> bool:
    # A hash of the id, not a position: adding documents never moves others across the split.
    return _id_hash(doc_id, seed) % 1_000_000 < fraction * 1_000_000


def split(
    kept: list[Document], names: list[str], cfg: MixConfig
) -> tuple[dict[str, list[Document]], dict[str, list[Document]]]:
    """Train pool and val set per source, by a hash of each id.

    Val is capped at `val_max_docs_per_source` (the overflow goes back to the train pool, so
    no document is lost), and a source the hash gave no val document gets its lowest-hash
    one, so every source has a val score.
    """
    pool: dict[str, list[Document]] = defaultdict(list)
    val: dict[str, list[Document]] = defaultdict(list)
    for d in kept:
        wanted = _is_val(d.id, cfg.seed, cfg.val_fraction) and len(val[d.source]) < cfg.val_max_docs_per_source
        (val if wanted else pool)[d.source].append(d)
    for name in names:
        if not val[name] and len(pool[name]) > 1:
            pick = min(pool[name], key=lambda d: _id_hash(d.id, cfg.seed))
            pool[name].remove(pick)
            val[name].append(pick)
    return pool, val


def run(cfg: MixConfig, inputs: dict[str, Path], out_dir: Path, root: Path = Path(".")) -> dict[str, Any]:
    stats: dict[str, dict[str, Any]] = {
        s.name: {"docs_in": 0, "dropped": dict.fromkeys((*REASONS, "exact_duplicate", "near_duplicate"), 0),
                 "duplicate_clusters": 0}
        for s in cfg.sources
    }
    dropped: dict[str, list] = {"id": [], "source": [], "reason": [], "duplicate_of": []}

    def drop(doc: Document, reason: str, duplicate_of: str | None = None) -> None:
        stats[doc.source]["dropped"][reason] += 1
        for k, v in (("id", doc.id), ("source", doc.source), ("reason", reason), ("duplicate_of", duplicate_of)):
            dropped[k].append(v)

    # read, normalise, filter
    docs: list[Document] = []
    for src in cfg.sources:
        raw = read_source(src, root)
        stats[src.name]["docs_in"] = len(raw)
        for d in raw:
            doc = Document(d.id, d.source, normalize(d.text))
            reason = reason_to_drop(doc.text, cfg.filters)
            if reason:
                drop(doc, reason)
            else:
                docs.append(doc)
        _log(f"{src.name}: {len(raw)} documents read")

    # exact, then near duplicates, across all sources
    outcome = deduplicate([d.text for d in docs], cfg.dedup)
    kept = [d for d, k in zip(docs, outcome.keep.tolist(), strict=True) if k]
    keepers_with_twins: set[int] = set()
    for i in np.flatnonzero(~outcome.keep).tolist():
        j = int(outcome.duplicate_of[i])  # always a kept document, even through chains
        keepers_with_twins.add(j)
        drop(docs[i], "exact_duplicate" if outcome.reason[i] == EXACT else "near_duplicate", docs[j].id)
    for j in keepers_with_twins:  # a cluster: a kept document and the twins removed in its favour
        stats[docs[j].source]["duplicate_clusters"] += 1
    c = outcome.counts()
    _log(f"dedup: {c['exact_removed']} exact, {c['near_removed']} near duplicates "
         f"({c['confirmed_pairs']}/{c['candidate_pairs']} candidate pairs confirmed)")

    by_source, val = split(kept, [s.name for s in cfg.sources], cfg)
    survivors = Counter(d.source for d in kept)
    sizer = mixing.Sizer(cfg.mixing)
    sizes = {s.name: sizer.sizes([d.text for d in by_source[s.name]]) for s in cfg.sources}
    shares = {s.name: s.share for s in cfg.sources}
    for name in shares:
        if not by_source[name]:
            raise LmforgeError(
                f"source '{name}' has no training documents left after filters, dedup and the val split; "
                "loosen mix.filters, lower val_fraction, or drop the source"
            )
    total = mixing.budget({n: sum(v) for n, v in sizes.items()}, shares, cfg.mixing.total)
    draws: list[mixing.Draw] = []
    drawn: dict[str, mixing.SourceDraw] = {}
    for idx, src in enumerate(cfg.sources):
        drawn[src.name] = mixing.draw_source(
            by_source[src.name], sizes[src.name], src.share * total, cfg.mixing.max_epochs, cfg.seed, idx
        )
        draws.extend(drawn[src.name].draws)
    draws = mixing.shuffle(draws, cfg.seed)
    selected_total = sum(x.selected for x in drawn.values())

    # write
    names = [s.name for s in cfg.sources]
    train_cols = {
        "id": [d.doc.id if d.epoch == 0 else f"{d.doc.id}@{d.epoch}" for d in draws],
        "source": [d.doc.source for d in draws],
        "text": [d.doc.text for d in draws],
    }
    val_docs = [d for n in names for d in val[n]]
    val_cols = {"id": [d.id for d in val_docs], "source": [d.source for d in val_docs],
                "text": [d.text for d in val_docs]}
    schema = schemas.mix_shard(names)
    shards.write_shards(train_cols, out_dir / "train", schema, cfg.rows_per_shard, "mix train")
    shards.write_shards(val_cols, out_dir / "val", schema, cfg.rows_per_shard, "mix val")
    shards.write_table(dropped, out_dir / "dropped.parquet", schemas.DROPPED, "mix dropped")

    # metrics: deterministic counts only
    val_sizes = {n: sum(sizer.sizes([d.text for d in val[n]])) for n in names}
    for src in cfg.sources:
        st, dr = stats[src.name], drawn[src.name]
        st.update(
            docs_kept=survivors[src.name],  # after filters and dedup, before split and mixing
            train_pool_docs=len(by_source[src.name]),  # kept minus val
            units_available=dr.available,
            units_train=dr.selected,
            train_docs=len(dr.draws),
            epochs=dr.epochs,
            target_share=src.share,
            achieved_share=round(dr.selected / selected_total, 6) if selected_total else 0.0,
            val_docs=len(val[src.name]),
            units_val=val_sizes[src.name],
        )
        st["docs_dropped"] = sum(st["dropped"].values())
    reasons = Counter(dropped["reason"])
    return {
        "unit": cfg.mixing.unit,
        "sources": stats,
        "total": {
            "docs_in": sum(s["docs_in"] for s in stats.values()),
            "docs_kept": len(kept),
            "docs_dropped": len(dropped["id"]),
            "train_docs": len(draws),
            "val_docs": len(val_docs),
            "units_train": selected_total,
            "units_val": sum(val_sizes.values()),
        },
        "dropped": {r: reasons.get(r, 0) for r in (*REASONS, "exact_duplicate", "near_duplicate")},
        "dedup": {"candidate_pairs": c["candidate_pairs"], "confirmed_pairs": c["confirmed_pairs"],
                  "exact_groups": c["exact_groups"], "near_clusters": c["near_clusters"],
                  "clusters": len(keepers_with_twins)},
    }

