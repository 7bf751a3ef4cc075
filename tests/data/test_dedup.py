"""Exact and near-duplicate removal: quality on a planted corpus, the parts, the jsonl command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lmforge.config import build
from lmforge.data import minhash
from lmforge.data.dedup import (
    EXACT,
    KEPT,
    NEAR,
    DedupConfig,
    dedup_jsonl,
    deduplicate,
    exact_duplicates,
    near_duplicates,
)
from lmforge.errors import ConfigError, InputError

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "bench"))
import corpus  # noqa: E402  (bench/corpus.py: the planted-duplicate generator, shared with the bench)


@pytest.fixture(scope="module")
def planted() -> corpus.PlantedCorpus:
    return corpus.planted_corpus(3000, seed=0)


def _planted_jaccard(pc: corpus.PlantedCorpus, kind: str, ngram: int = 5) -> np.ndarray:
    """Exact Jaccard (normalised word shingles) of each planted copy of `kind` with its original."""
    flat, offsets = minhash.shingle_hashes(pc.texts, ngram, 0)
    copies = pc.indices(kind)
    return minhash.exact_jaccard(flat, offsets, np.stack([pc.source[copies], copies], 1))


# --- quality -------------------------------------------------------------------------------


def test_planted_corpus_quality(planted: corpus.PlantedCorpus) -> None:
    # The shipped defaults (3-word shingles, threshold 0.8). 1-2% word edits cost up to
    # 2 * ngram shingles each: with 3-word shingles the planted near copies sit above ~0.8
    # Jaccard and the hard negatives at ~1/3.
    assert _planted_jaccard(planted, corpus.NEAR, ngram=3).mean() > 0.85
    assert _planted_jaccard(planted, corpus.NEGATIVE, ngram=3).max() < 0.5
    out = deduplicate(planted.texts, DedupConfig())
    assert out.near.bands * out.near.rows <= 128
    removed = ~out.keep
    exact, near, neg = (planted.indices(k) for k in (corpus.EXACT, corpus.NEAR, corpus.NEGATIVE))
    assert len(exact) > 150 and len(near) > 400 and len(neg) > 250
    assert (out.reason[exact] == EXACT).all()
    assert (out.reason[near] == NEAR).mean() >= 0.95
    assert removed[neg].mean() <= 0.01
    assert (out.reason[planted.indices(corpus.ORIGINAL)] == KEPT).mean() >= 0.99
    # each removed copy is attributed to the original it was made from
    assert (out.duplicate_of[exact] == planted.source[exact]).all()
    assert (out.duplicate_of[near] == planted.source[near]).mean() >= 0.95
    counts = out.counts()
    assert counts["read"] == len(planted.texts)
    assert counts["kept"] == counts["read"] - counts["exact_removed"] - counts["near_removed"]
    assert counts["near_clusters"] == out.near.n_clusters > 250


def test_default_config_recall_against_exact_jaccard(planted: corpus.PlantedCorpus) -> None:
    # at the default 0.8, pairs clearly above the threshold are found, hard negatives never
    j = _planted_jaccard(planted, corpus.NEAR)
    near = planted.indices(corpus.NEAR)
    out = deduplicate(planted.texts, DedupConfig())
    assert (~out.keep[near[j >= 0.85]]).mean() >= 0.95
    assert out.keep[planted.indices(corpus.NEGATIVE)].all()


def test_normalisation_is_what_defeats_case_punctuation_and_whitespace_noise(
    planted: corpus.PlantedCorpus,
) -> None:
    near = planted.indices(corpus.NEAR)
    raw = deduplicate(planted.texts, DedupConfig(threshold=0.7, normalise=False))
    assert (~raw.keep[near]).mean() < 0.5


def test_exact_verification_matches_its_definition(planted: corpus.PlantedCorpus) -> None:
    cfg = DedupConfig(threshold=0.8, verify="exact")
    res = near_duplicates(planted.texts, cfg)
    flat, offsets = minhash.shingle_hashes(planted.texts, cfg.ngram, cfg.seed)
    removed = np.flatnonzero(~res.keep)
    # every removal is backed by a chain of pairs at >= 0.8; its direct link to the
    # representative is usually one of them
    j = minhash.exact_jaccard(flat, offsets, np.stack([res.duplicate_of[removed], removed], 1))
    assert (j >= 0.8).mean() > 0.9
    assert res.confirmed_pairs <= res.candidate_pairs


# --- determinism and the parts --------------------------------------------------------------


def test_deterministic_and_seed_dependent(planted: corpus.PlantedCorpus) -> None:
    texts = planted.texts[:1500]
    a = near_duplicates(texts, DedupConfig(seed=7))
    b = near_duplicates(texts, DedupConfig(seed=7))
    for f in ("keep", "cluster", "duplicate_of"):
        assert np.array_equal(getattr(a, f), getattr(b, f))
    assert (a.candidate_pairs, a.confirmed_pairs) == (b.candidate_pairs, b.confirmed_pairs)
    h7, _ = minhash.shingle_hashes(texts[:5], 5, 7)
    h8, _ = minhash.shingle_hashes(texts[:5], 5, 8)
    assert not np.array_equal(h7, h8)


def _reference_shingles(text: str, n: int, normalise: bool = True) -> set[str]:
    words = (minhash.normalise(text) if normalise else text.replace("\x01", " ")).split()
    if len(words) < n:
        return {" ".join(words)}
    return {" ".join(words[i : i + n]) for i in range(len(words) - n + 1)}


TRICKY = [
    "The quick brown fox jumps over the lazy dog, again and again.",
    "the QUICK  brown\tfox -- jumps over the lazy dog; again and again!",
    "Café déjà vu: naïve façade, ÉLAN, straße and more words here",
    "cafe deja vu naive facade elan strasse and more words here",
    "short text",
    "",
    "   ...   ",
    "a\x01b c d e f g h",
    "supercalifragilisticexpialidocious antidisestablishmentarianism x y z w",
    "supercalifragilisticexpialidociousness antidisestablishmentarianism x y z w",
    "1234567 12345678 123456789 1234567890123456 12345678901234567 a b",
    "word " * 30,
    "日本語 の テキスト も 単語 で 区切る ことが できる",
    "non\u00a0breaking\u2003spaces and a lone \ud800 surrogate here",
    "İstanbul ΣΊΣΥΦΟΣ straße “quoted” ‘words’ end",
]


@pytest.mark.parametrize("normalise", [True, False])
def test_shingle_hashes_agree_with_string_shingles(normalise: bool) -> None:
    flat, offsets = minhash.shingle_hashes(TRICKY, 3, 42, normalise=normalise)
    sets = [_reference_shingles(t, 3, normalise) for t in TRICKY]
    n = len(TRICKY)
    for i in range(n):
        assert len(np.unique(flat[offsets[i] : offsets[i + 1]])) == len(sets[i]), TRICKY[i]
    pairs = np.array([(i, j) for i in range(n) for j in range(i + 1, n)])
    got = minhash.exact_jaccard(flat, offsets, pairs)
    want = [len(sets[i] & sets[j]) / len(sets[i] | sets[j]) for i, j in pairs]
    assert np.allclose(got, want)


def test_shingle_hashes_do_not_depend_on_the_batch(monkeypatch: pytest.MonkeyPatch) -> None:
    texts = corpus.WordSampler(np.random.default_rng(3)).texts(40) + TRICKY
    one_flat, one_off = minhash.shingle_hashes(texts, 5, 1)
    monkeypatch.setattr(minhash, "_BATCH_CHARS", 700)  # many batches, ASCII and non-ASCII ones
    flat, off = minhash.shingle_hashes(texts, 5, 1)
    assert np.array_equal(one_flat, flat) and np.array_equal(one_off, off)
    alone = [minhash.shingle_hashes([t], 5, 1)[0] for t in texts]
    assert all(np.array_equal(a, flat[off[i] : off[i + 1]]) for i, a in enumerate(alone))


def test_exact_duplicates_point_at_the_first_copy() -> None:
    got = exact_duplicates(["a", "b", "a", "c", "b", "a", "A"])
    assert got.tolist() == [-1, -1, 0, -1, 1, 0, -1]


def test_clusters_keep_the_lowest_index() -> None:
    rng = np.random.default_rng(5)
    sampler = corpus.WordSampler(rng)
    a, b, c = sampler.texts(3, median_words=200, min_words=150)
    a1 = corpus.near_copy(a, rng, sampler)
    a2 = corpus.near_copy(a, rng, sampler)
    b1 = b.upper() + " !!"
    res = near_duplicates([a, b, a1, c, a2, b1], DedupConfig(threshold=0.6))
    assert res.keep.tolist() == [True, True, False, True, False, False]
    assert res.duplicate_of.tolist() == [-1, -1, 0, -1, 0, 1]
    assert res.cluster.tolist() == [0, 1, 0, -1, 0, 1]
    assert (res.n_clusters, res.n_removed) == (2, 3)


def test_components_are_order_free() -> None:
    pairs = np.array([[3, 4], [1, 2], [2, 3], [5, 6], [0, 0]])
    want = [0, 1, 1, 1, 1, 5, 5, 7]
    assert minhash.components(8, pairs).tolist() == want
    assert minhash.components(8, pairs[::-1].copy()).tolist() == want
    assert minhash.components(3, np.empty((0, 2), dtype=np.int64)).tolist() == [0, 1, 2]


def test_big_buckets_stay_connected_without_all_pairs() -> None:
    sig = np.zeros((300, 8), dtype=np.uint32)  # a bucket of 250 identical signatures
    sig[250:] = 1  # and one of 50
    pairs = minhash.candidate_pairs(sig, 2, 4, max_bucket=64)
    big = pairs[pairs[:, 1] < 250]
    assert len(big) == 2 * 249 - 1  # star + chain (sharing (0, 1)), not 250 * 249 / 2
    assert len(pairs) - len(big) == 50 * 49 // 2  # all pairs of the small bucket
    roots = minhash.components(300, pairs)
    assert set(roots[:250].tolist()) == {0} and set(roots[250:].tolist()) == {250}


def test_rensa_flags_equal_numpy_banding(planted: corpus.PlantedCorpus) -> None:
    # lsh_candidates trusts rensa's flags to pick the documents worth banding in numpy
    flat, offsets = minhash.shingle_hashes(planted.texts[:2000], 5, 42)
    for bands, rows in [(14, 9), (16, 8), (9, 13)]:
        full = minhash.candidate_pairs(minhash.signatures(flat, offsets, bands * rows, 42), bands, rows)
        cand = minhash.lsh_candidates(flat, offsets, bands, rows, 42)
        assert np.array_equal(cand.pairs, full)
        assert np.array_equal(cand.docs, np.unique(full))  # flagged exactly when in a pair
        assert np.array_equal(
            cand.sig[cand.local()[:, 0]], minhash.signatures(flat, offsets, bands * rows, 42, full[:, 0])
        )


def test_optimal_bands_match_datasketch() -> None:
    lsh = pytest.importorskip("datasketch.lsh")
    for t, n, w in [
        (0.5, 128, (0.5, 0.5)),
        (0.8, 128, (0.5, 0.5)),
        (0.8, 128, (0.1, 0.9)),
        (0.9, 256, (0.3, 0.7)),
    ]:
        assert minhash.optimal_bands(t, n, *w) == tuple(lsh._optimal_param(t, n, *w))
    assert DedupConfig().lsh_shape() == (14, 9)
    assert DedupConfig(verify="none").lsh_shape() == (9, 13)
    assert DedupConfig(bands=20, rows=5).lsh_shape() == (20, 5)


# --- config ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"bands": 16}, "bands and rows go together"),
        ({"rows": 8}, "bands and rows go together"),
        ({"bands": 16, "rows": 9}, "exceeds num_perm = 128"),
        ({"bands": 0, "rows": 9}, "bands and rows must be >= 1"),
        ({"threshold": 0.0}, "threshold is a Jaccard similarity"),
        ({"threshold": 1.5}, "threshold is a Jaccard similarity"),
        ({"ngram": 0}, "ngram is the shingle size"),
        ({"num_perm": 1}, "num_perm is the number of MinHash slots"),
        ({"seed": -1}, "seed must be a non-negative integer"),
        ({"verify": "maybe"}, "mix: dedup.verify"),
        (
            {"treshold": 0.8},
            "unknown key; allowed keys here: bands, ngram, normalise, num_perm, rows, seed, threshold, verify",
        ),
        ({"num_perm": "128"}, "mix: dedup.num_perm"),
    ],
)
def test_config_errors_say_what_to_do(params: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        build(DedupConfig, params, "mix: dedup")
    assert message in str(e.value)


def test_config_accepts_a_boolean_verify() -> None:
    assert DedupConfig(verify=True).verify == "signature"
    assert DedupConfig(verify=False).verify == "none"
    assert DedupConfig(threshold=1).threshold == 1.0


# --- dedup_jsonl and the command ------------------------------------------------------------


def _jsonl_with_duplicates(tmp_path: Path) -> tuple[Path, list[bytes]]:
    rng = np.random.default_rng(11)
    sampler = corpus.WordSampler(rng)
    a, b, c = sampler.texts(3, median_words=120, min_words=100)
    records = [
        {"id": "a", "text": a, "extra": [1, 2]},
        {"text": b},
        {"id": 3, "text": a},  # exact duplicate
        {"id": "c", "text": c + " — naïve café"},
        {"id": "a-near", "text": corpus.near_copy(a, rng, sampler)},
    ]
    lines = [
        json.dumps(r, ensure_ascii=i % 2 == 0).encode() + (b"\r\n" if i == 1 else b"\n")
        for i, r in enumerate(records)
    ]
    lines[3] = lines[3].replace(b", ", b",    ")  # odd spacing must survive byte for byte
    lines[-1] = lines[-1].rstrip(b"\n")  # no newline at the end of the file
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"".join(lines))
    return path, lines


def test_dedup_jsonl_writes_kept_lines_byte_identical(tmp_path: Path) -> None:
    src, lines = _jsonl_with_duplicates(tmp_path)
    out = tmp_path / "out" / "kept.jsonl"
    counts = dedup_jsonl(src, out, DedupConfig(threshold=0.7))
    assert out.read_bytes() == lines[0] + lines[1] + lines[3]
    assert counts == {
        "read": 5,
        "exact_removed": 1,
        "exact_groups": 1,
        "near_removed": 1,
        "near_clusters": 1,
        "candidate_pairs": counts["candidate_pairs"],
        "confirmed_pairs": 1,
        "kept": 3,
    }
    assert [p.name for p in out.parent.iterdir()] == ["kept.jsonl"]  # no temp files left


BAD_INPUTS = [
    (b'{"text": "fine"}\n{"text": "broken\n', 2, "malformed JSON"),
    (b'{"text": "fine"}\n{"id": 1}\n', 2, "missing field 'text'"),
    (b'{"text": "fine"}\n{"text": 12}\n', 2, "field 'text' must be a string, got int"),
    (b'{"text": null}\n', 1, "field 'text' must be a string, got NoneType"),
    (b'{"text": "fine"}\n["text"]\n', 2, "expected a JSON object, got list"),
    (b'{"text": "fine"}\n{"text": "caf\xe9"}\n', 2, "not UTF-8"),
    (b"", None, "no records"),
]


@pytest.mark.parametrize(("data", "line", "problem"), BAD_INPUTS)
def test_dedup_jsonl_rejects_bad_input_and_writes_nothing(
    tmp_path: Path, data: bytes, line: int | None, problem: str
) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(data)
    out = tmp_path / "out.jsonl"
    with pytest.raises(InputError) as e:
        dedup_jsonl(src, out, DedupConfig())
    where = f"{src}:{line}:" if line else f"{src}:"
    assert str(e.value).startswith(where) and problem in str(e.value) and "(fix: " in str(e.value)
    assert not out.exists()
    out.write_bytes(b"previous output\n")
    with pytest.raises(InputError):
        dedup_jsonl(src, out, DedupConfig())
    assert out.read_bytes() == b"previous output\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]


def _lmforge(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib")}
    return subprocess.run(
        [sys.executable, "-m", "lmforge.cli", "dedup", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )


def test_cli_prints_counts(tmp_path: Path) -> None:
    src, lines = _jsonl_with_duplicates(tmp_path)
    out = tmp_path / "out.jsonl"
    r = _lmforge("--input", str(src), "--output", str(out), "--threshold", "0.7")
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == lines[0] + lines[1] + lines[3]
    got = {" ".join(ln.split()[:-1]): int(ln.split()[-1]) for ln in r.stdout.splitlines()[1:]}
    assert got == {
        "read": 5,
        "exact duplicates removed": 1,
        "near duplicates removed": 1,
        "duplicate clusters": 1,
        "kept": 3,
    }


def test_cli_bad_input_exits_non_zero_naming_file_and_line(tmp_path: Path) -> None:
    src = tmp_path / "in.jsonl"
    src.write_bytes(b'{"text": "fine"}\n{"text": "fine"}\n{"text": 3.5}\n')
    out = tmp_path / "out.jsonl"
    r = _lmforge("--input", str(src), "--output", str(out))
    assert r.returncode == 2
    assert f"{src}:3: field 'text' must be a string, got float" in r.stderr
    assert not out.exists()
    r = _lmforge("--input", str(tmp_path / "missing.jsonl"), "--output", str(out), "--threshold", "2")
    assert r.returncode == 2 and "threshold is a Jaccard similarity" in r.stderr
    assert not out.exists()


def test_wordless_texts_are_nobodys_near_duplicate() -> None:
    out = deduplicate(["!!!", "???", "\U0001f600\U0001f600", "", "...", "!!!"], DedupConfig())
    # only the exact copy of "!!!" goes; the rest share no word with anything
    assert out.keep.tolist() == [True, True, True, True, True, False]
