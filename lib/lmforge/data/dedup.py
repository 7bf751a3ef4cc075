"""Exact and near-duplicate removal (MinHash LSH) for the `mix` stage and `lmforge dedup`.

    from lmforge.data.dedup import DedupConfig, deduplicate, dedup_jsonl
    out = deduplicate(texts, DedupConfig(threshold=0.8))   # out.keep, out.reason, out.counts()
    dedup_jsonl(Path("in.jsonl"), Path("out.jsonl"), DedupConfig())

    lmforge dedup --input in.jsonl --output out.jsonl [--threshold 0.8]

Near duplicates, in order:
1. normalise (lowercase, punctuation to spaces, whitespace collapsed) so case, punctuation
   and whitespace noise hide nothing, and cut each text into word `ngram`-shingles;
2. MinHash signatures (rensa's R-MinHash, `num_perm` slots, seeded by `seed`);
3. LSH with `bands` x `rows`: documents that agree on every slot of some band are candidate
   pairs. When not given, bands and rows minimise a weighted sum of the expected false
   positive and false negative areas (datasketch's routine); with verification on, false
   negatives weigh 9x more, since a false candidate costs a check while a missed pair is lost;
4. verification (`verify`): a candidate pair is confirmed only if its Jaccard similarity is
   >= `threshold`: estimated from the full signatures ("signature", the default), computed
   exactly on the shingle sets ("exact", slower, no estimation error), or not checked
   ("none": every candidate pair counts);
5. clusters: union-find over confirmed pairs; each cluster keeps its lowest-index document.

Exact duplicates (identical raw text) are removed first; `deduplicate` then runs the near
pass on what is left and records, for every removed document, why and in favour of which.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import field_validator, model_validator

from .. import atomic
from ..config import Config, build
from ..errors import InputError
from . import jsonl, minhash

_WORD = re.compile(r"[^\W_]")  # a letter or digit in any script

KEPT, EXACT, NEAR = 0, 1, 2  # values of DedupOutcome.reason
# (false positive, false negative) weights for choosing bands x rows; see the module docstring
_WEIGHTS_VERIFIED = (0.1, 0.9)
_WEIGHTS_UNVERIFIED = (0.5, 0.5)


class DedupConfig(Config):
    """Near-duplicate detection settings (the `dedup` block of the mix stage's params)."""

    # Words per shingle. 3, not the web-scale 5: with 5, one edited word in 50 costs ~10% of
    # the shingles and pushes 1-2%-edited copies under a 0.8 Jaccard (measured: 93% recall vs 100%).
    ngram: int = 3
    num_perm: int = 128  # MinHash slots per signature
    bands: int | None = None  # LSH bands; with rows, both or neither (None: chosen)
    rows: int | None = None  # signature slots per band
    threshold: float = 0.8  # Jaccard similarity at or above which two documents are duplicates
    verify: Literal["signature", "exact", "none"] = "signature"  # true/false mean signature/none
    seed: int = 42  # seeds the shingle hashes and the MinHash permutations
    normalise: bool = True  # lowercase, punctuation to spaces, whitespace collapsed first

    @field_validator("verify", mode="before")
    @classmethod
    def _verify_bool(cls, v: Any) -> Any:
        # `verify: true/false` reads naturally in YAML: true is the signature check
        if isinstance(v, bool):
            return "signature" if v else "none"
        return v

    @field_validator("ngram")
    @classmethod
    def _ngram(cls, v: int) -> int:
        if not 1 <= v <= 64:
            raise ValueError(
                f"ngram is the shingle size in words; use 1-64 (5 is usual for web text), got {v}"
            )
        return v

    @field_validator("num_perm")
    @classmethod
    def _num_perm(cls, v: int) -> int:
        if not 2 <= v <= 4096:
            raise ValueError(f"num_perm is the number of MinHash slots; use 2-4096 (128 is usual), got {v}")
        return v

    @field_validator("threshold")
    @classmethod
    def _threshold(cls, v: float) -> float:
        if not 0.0 < v <= 1.0:
            raise ValueError(f"threshold is a Jaccard similarity; use a value in (0, 1], e.g. 0.8, got {v}")
        return v

    @field_validator("seed")
    @classmethod
    def _seed(cls, v: int) -> int:
        if not 0 <= v < 2**63:
            raise ValueError(f"seed must be a non-negative integer below 2**63, got {v}")
        return v

    @model_validator(mode="after")
    def _bands_rows(self) -> DedupConfig:
        if (self.bands is None) != (self.rows is None):
            raise ValueError(
                "bands and rows go together: give both (bands * rows <= num_perm) "
                "or neither to have them chosen from threshold and num_perm"
            )
        if self.bands is not None and self.rows is not None:
            if self.bands < 1 or self.rows < 1:
                raise ValueError(f"bands and rows must be >= 1, got bands={self.bands}, rows={self.rows}")
            if self.bands * self.rows > self.num_perm:
                raise ValueError(
                    f"bands * rows = {self.bands} * {self.rows} = {self.bands * self.rows} exceeds "
                    f"num_perm = {self.num_perm}: lower bands or rows, or raise num_perm"
                )
        return self

    def lsh_shape(self) -> tuple[int, int]:
        """(bands, rows): as given, else the optimum for threshold and num_perm."""
        if self.bands is not None and self.rows is not None:
            return self.bands, self.rows
        weights = _WEIGHTS_UNVERIFIED if self.verify == "none" else _WEIGHTS_VERIFIED
        return minhash.optimal_bands(self.threshold, self.num_perm, *weights)


@dataclass(frozen=True)
class DedupResult:
    """Near-duplicate detection over n documents."""

    keep: np.ndarray  # bool (n,): the first (lowest-index) document of each cluster, and singletons
    cluster: np.ndarray  # int (n,): cluster id 0..n_clusters-1 in order of first member, -1 alone
    duplicate_of: np.ndarray  # int (n,): index of the kept document of its cluster, -1 if kept
    n_clusters: int  # clusters of two or more documents
    n_removed: int
    candidate_pairs: int  # distinct pairs sharing an LSH band
    confirmed_pairs: int  # candidate pairs that passed verification
    bands: int
    rows: int
    pairs: np.ndarray  # int (confirmed_pairs, 2): the confirmed pairs (i < j), sorted


def exact_duplicates(texts: Sequence[str]) -> np.ndarray:
    """For each text, the index of the first identical text before it, or -1 if it is the first."""
    first: dict[str, int] = {}
    out = np.empty(len(texts), dtype=np.int64)
    for i, t in enumerate(texts):
        j = first.setdefault(t, i)
        out[i] = -1 if j == i else j
    return out


def near_duplicates(texts: Sequence[str], cfg: DedupConfig) -> DedupResult:
    """Near-duplicate clusters of `texts` under `cfg` (see the module docstring for the steps)."""
    n = len(texts)
    bands, rows = cfg.lsh_shape()
    flat, offsets = minhash.shingle_hashes(texts, cfg.ngram, cfg.seed, normalise=cfg.normalise)
    cand = minhash.lsh_candidates(flat, offsets, bands, rows, cfg.seed)
    pairs = cand.pairs
    if cfg.verify == "none" or len(pairs) == 0:
        confirmed = pairs
    elif cfg.verify == "exact":
        confirmed = pairs[minhash.exact_jaccard(flat, offsets, pairs) >= cfg.threshold]
    else:
        if bands * rows == cfg.num_perm:  # the LSH signatures are the full ones
            sig, local = cand.sig, cand.local()
        else:
            docs, local = np.unique(pairs, return_inverse=True)
            sig = minhash.signatures(flat, offsets, cfg.num_perm, cfg.seed, docs)
        est = minhash.signature_jaccard(sig, local.reshape(pairs.shape))
        confirmed = pairs[est >= cfg.threshold]
    if len(confirmed):
        # Texts without a single word all shingle to the same "empty" hash; sharing nothing, they
        # are no one's near duplicate (identical ones are still caught by the exact pass).
        wordless = np.array([_WORD.search(t) is None for t in texts], dtype=bool)
        confirmed = confirmed[~(wordless[confirmed[:, 0]] | wordless[confirmed[:, 1]])]
    root = minhash.components(n, confirmed)
    keep = root == np.arange(n)
    in_cluster = np.zeros(n, dtype=bool)
    in_cluster[root[~keep]] = True
    in_cluster |= ~keep
    reps = np.flatnonzero(keep & in_cluster)
    cluster_of_rep = np.full(n, -1, dtype=np.int64)
    cluster_of_rep[reps] = np.arange(len(reps))
    return DedupResult(
        keep=keep,
        cluster=np.where(in_cluster, cluster_of_rep[root], -1),
        duplicate_of=np.where(keep, -1, root),
        n_clusters=len(reps),
        n_removed=int((~keep).sum()),
        candidate_pairs=len(pairs),
        confirmed_pairs=len(confirmed),
        bands=bands,
        rows=rows,
        pairs=confirmed,
    )


@dataclass(frozen=True)
class DedupOutcome:
    """Exact then near-duplicate removal over n documents: what is kept, and why the rest is not."""

    keep: np.ndarray  # bool (n,)
    reason: np.ndarray  # int8 (n,): KEPT, EXACT or NEAR
    duplicate_of: np.ndarray  # int (n,): the kept document a removed one duplicates, -1 if kept
    near: DedupResult  # the near pass, over the documents left after exact removal
    exact_groups: int  # distinct texts that had identical copies

    def counts(self) -> dict[str, int]:
        return {
            "read": len(self.keep),
            "exact_removed": int((self.reason == EXACT).sum()),
            "exact_groups": self.exact_groups,
            "near_removed": int((self.reason == NEAR).sum()),
            "near_clusters": self.near.n_clusters,
            "candidate_pairs": self.near.candidate_pairs,
            "confirmed_pairs": self.near.confirmed_pairs,
            "kept": int(self.keep.sum()),
        }


def deduplicate(texts: Sequence[str], cfg: DedupConfig) -> DedupOutcome:
    """Remove exact duplicates (raw text), then near duplicates among the rest."""
    first = exact_duplicates(texts)
    unique = np.flatnonzero(first < 0)
    near = near_duplicates([texts[i] for i in unique], cfg)
    keep = np.zeros(len(texts), dtype=bool)
    keep[unique] = near.keep
    reason = np.where(first >= 0, EXACT, KEPT).astype(np.int8)
    reason[unique[~near.keep]] = NEAR
    dup_of = first.copy()
    dup_of[unique[~near.keep]] = unique[near.duplicate_of[~near.keep]]
    # an exact copy of a text that the near pass removed points at that text's keeper
    exact = first >= 0
    dup_of[exact] = np.where(keep[first[exact]], first[exact], dup_of[first[exact]])
    return DedupOutcome(
        keep=keep,
        reason=reason,
        duplicate_of=dup_of,
        near=near,
        exact_groups=len(np.unique(first[exact])),
    )


def read_jsonl_texts(path: Path) -> tuple[list[bytes], list[str]]:
    """The raw lines (terminators kept) and `text` fields of a jsonl file; InputError on any bad line."""
    lines: list[bytes] = []
    texts: list[str] = []
    for n, raw, rec in jsonl.records(path):
        lines.append(raw)
        texts.append(jsonl.text_of(rec, "text", path, n))
    if not texts:
        raise InputError(path, "no records: the file is empty", fix="pass a jsonl file with at least one record")
    return lines, texts


def dedup_jsonl(input: Path, output: Path, cfg: DedupConfig) -> dict[str, int]:
    """Write the records of `input` that survive `deduplicate` to `output`, byte for byte.

    The whole input is checked before anything is written, and `output` is replaced
    atomically: on any error it is left as it was (or absent).
    """
    lines, texts = read_jsonl_texts(Path(input))
    outcome = deduplicate(texts, cfg)
    with atomic.atomic_path(output) as tmp, open(tmp, "wb") as fh:
        for i in np.flatnonzero(outcome.keep):
            fh.write(lines[i])
    return outcome.counts()


def cli_dedup(args: argparse.Namespace) -> int:
    """`lmforge dedup`: dedup a jsonl file, print the counts."""
    cfg = build(
        DedupConfig,
        {"threshold": args.threshold, "num_perm": args.num_perm, "ngram": args.ngram, "seed": args.seed},
        "lmforge dedup",
    )
    counts = dedup_jsonl(Path(args.input), Path(args.output), cfg)
    bands, rows = cfg.lsh_shape()
    print(
        f"lmforge dedup: {args.input} -> {args.output} (threshold {cfg.threshold}, {bands} bands x {rows} rows)"
    )
    for label, key in [
        ("read", "read"),
        ("exact duplicates removed", "exact_removed"),
        ("near duplicates removed", "near_removed"),
        ("duplicate clusters", "near_clusters"),
        ("kept", "kept"),
    ]:
        print(f"  {label:<26}{counts[key]:>10}")
    return 0
