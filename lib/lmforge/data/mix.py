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

import xxhash
from pydantic import field_validator, model_validator

from ..config import StageConfig
from ..errors import LmforgeError
from . import mixing, schemas, shards
from .dedup import DedupConfig, exact_duplicates, near_duplicates
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


def _is_val(doc_id: str, seed: int, fraction: float) -> bool:
    # A hash of the id, not a position: adding documents never moves others across the split.
    return xxhash.xxh64_intdigest(doc_id.encode("utf-8"), seed=seed) % 1_000_000 < fraction * 1_000_000


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
    first = exact_duplicates([d.text for d in docs])
    unique = []
    for d, f in zip(docs, first, strict=True):
        if f >= 0:
            drop(d, "exact_duplicate", docs[f].id)
        else:
            unique.append(d)
    near = near_duplicates([d.text for d in unique], cfg.dedup)
    kept: list[Document] = []
    for i, d in enumerate(unique):
        if near.keep[i]:
            kept.append(d)
        else:
            drop(d, "near_duplicate", unique[int(near.duplicate_of[i])].id)
    reps: dict[int, int] = {}  # cluster -> its lowest index, the document kept
    for i, c in enumerate(near.cluster.tolist()):
        if c >= 0 and c not in reps:
            reps[c] = i
            stats[unique[i].source]["duplicate_clusters"] += 1
    _log(f"dedup: {len(docs) - len(unique)} exact, {near.n_removed} near duplicates "
         f"({near.confirmed_pairs}/{near.candidate_pairs} candidate pairs confirmed)")

    # split, then mix the train side to the target shares
    by_source: dict[str, list[Document]] = defaultdict(list)
    val: dict[str, list[Document]] = defaultdict(list)
    survivors = Counter(d.source for d in kept)
    for d in kept:
        if _is_val(d.id, cfg.seed, cfg.val_fraction):
            if len(val[d.source]) < cfg.val_max_docs_per_source:
                val[d.source].append(d)
        else:
            by_source[d.source].append(d)
    sizer = mixing.Sizer(cfg.mixing)
    sizes = {s.name: sizer.sizes([d.text for d in by_source[s.name]]) for s in cfg.sources}
    shares = {s.name: s.share for s in cfg.sources}
    for name in shares:
        if not by_source[name]:
            raise LmforgeError(
                f"source '{name}' has no training documents left after filters, dedup and the val split; "
                "loosen mix.filters, lower val_fraction, or drop the source"
            )
    total = mixing.budget({n: sum(v) for n, v in sizes.items()}, shares, cfg.mixing.total, cfg.mixing.max_epochs)
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
            train_pool_docs=len(by_source[src.name]),
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
        "dedup": {"candidate_pairs": near.candidate_pairs, "confirmed_pairs": near.confirmed_pairs,
                  "clusters": near.n_clusters},
    }

