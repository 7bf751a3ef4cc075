"""MinHash machinery for near-duplicate detection: shingles, signatures, LSH bands, clusters.

    flat, offsets = shingle_hashes(texts, ngram=5, seed=42)     # u64 shingle hashes, CSR rows
    bands, rows = optimal_bands(0.8, 128, fp_weight=0.1, fn_weight=0.9)
    cand = lsh_candidates(flat, offsets, bands, rows, seed=42)  # cand.pairs: (k, 2) int64, i < j
    sig = signatures(flat, offsets, 128, seed=42, docs=np.unique(cand.pairs))
    roots = components(len(texts), confirmed_pairs)             # lowest index of each cluster

`lmforge.data.dedup` puts these together; use that unless you need the parts.

Engine choice, measured on this 2-core machine (~170-word documents, 128 permutations; the
end-to-end numbers against datasketch and rensa are in bench/results/dedup.md):
- Shingling runs on the UTF-8 bytes of a batch of documents in numpy: one `bytes.translate`
  (ASCII) or a code-point table lookup (other text) normalises the batch, every word is
  hashed from its bytes read 8 at a time, and n consecutive word hashes are mixed into a
  shingle hash. No Python object per word or shingle: ~130k docs/s, against ~12k docs/s for
  normalise + split + `" ".join(words[i:i+n])` in Python.
- Signatures are rensa's R-MinHash (`digest_matrix_from_flat_token_hashes`) fed the flat u64
  buffer: ~500k docs/s, against ~8k docs/s for a numpy-vectorised classic MinHash
  (a*h+b mod p is a pass over every shingle per permutation; R-MinHash does
  O(shingles + permutations) work per document, in Rust) and ~4.5k for datasketch.
- Getting a signature out of rensa costs more than making it (`to_rows` builds Python ints,
  ~10 us a document), so banding starts in rensa: `RMinHashLSH`'s one-shot duplicate flags
  mark the documents that share a band with another (checked to be exactly the documents
  in numpy's candidate pairs, see the tests). Only those are signed again and copied out,
  and numpy bands them to list the pairs, which rensa does not return. Our own banding
  also allows bands * rows < num_perm, which rensa's LSH does not.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import rensa

_U64 = np.uint64
_SEP = 0x01  # joins the documents of a batch; any \x01 inside a text becomes a space first
_SPACE = 0x20
_NON_WORD = re.compile(r"\W+")


def _is_kept_byte(c: int) -> bool:
    return 48 <= c <= 57 or 97 <= c <= 122 or c in (95, _SEP) or c >= 128


# Byte tables, the same as the regex on ASCII text; bytes >= 128 (UTF-8 of what
# _unicode_normalised has already dealt with) pass through.
# normalise: A-Z to a-z, [a-z0-9_] and the separator kept, every other ASCII byte a space.
_NORMALISE = bytes(c + 32 if 65 <= c <= 90 else c if _is_kept_byte(c) else _SPACE for c in range(256))
# no normalisation: only ASCII whitespace (what str.split splits on) becomes a space.
_WHITESPACE = bytes(_SPACE if 9 <= c <= 13 or 28 <= c <= 31 else c for c in range(256))

# ~0.5 MB of text per batch: the numpy temporaries stay below glibc's mmap threshold and are
# reused; 4 MB batches ran 1.5x slower here, paying a page fault on every fresh page.
_BATCH_CHARS = 500_000
_LEN_MASK = np.array([(1 << (8 * k)) - 1 for k in range(8)] + [2**64 - 1], dtype=_U64)


def normalise(text: str) -> str:
    """Lowercase, punctuation to spaces, whitespace collapsed: what `normalise=True` shingles."""
    return " ".join(_NON_WORD.sub(" ", text.lower()).split())


def fmix64(h: np.ndarray) -> np.ndarray:
    """MurmurHash3's 64-bit finaliser, in place: every input bit reaches every output bit."""
    h ^= h >> _U64(33)
    h *= _U64(0xFF51AFD7ED558CCD)
    h ^= h >> _U64(33)
    h *= _U64(0xC4CEB9FE1A85EC53)
    h ^= h >> _U64(33)
    return h


def _seeded_odd(seed: int, salt: int, n: int) -> np.ndarray:
    """n odd u64 multipliers drawn from (seed, salt): PCG64, the same on every platform."""
    draws = np.random.default_rng([seed, salt]).integers(0, 2**64, size=n, dtype=_U64, endpoint=False)
    return draws | _U64(1)


def _batches(texts: Sequence[str]) -> Iterator[tuple[int, int]]:
    start, size = 0, 0
    for i, t in enumerate(texts):
        size += len(t) + 1
        if size >= _BATCH_CHARS:
            yield start, i + 1
            start, size = i + 1, 0
    if start < len(texts):
        yield start, len(texts)


@functools.cache
def _unicode_tables() -> tuple[np.ndarray, np.ndarray]:
    """Per code point: kept by normalisation (\\w, or the separator), and whitespace (str.split's)."""
    every = "".join(map(chr, range(0x110000)))

    def marks(pattern: str) -> np.ndarray:
        # \x01 is the one code point that is its own marker; it is set by hand below
        marked = re.sub(pattern, "\x01", every).encode("utf-32-le", "surrogatepass")
        return np.frombuffer(marked, np.uint32) == _SEP

    word, space = marks(r"\w"), marks(r"\s")
    word[_SEP], space[_SEP] = True, False
    return word, space


def _unicode_normalised(texts: list[str], normalise: bool) -> list[str]:
    """`texts` with what `_batch_bytes`' byte table cannot see done: lowercasing and
    non-word to space (normalise), or Unicode whitespace to space (not), via UTF-32 code points
    and a lookup table: 4x faster here than the regex, which pays per match."""
    word, space = _unicode_tables()
    joined = "\x01".join(texts)
    if normalise:
        joined = joined.lower()
    cp = np.frombuffer(joined.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    cp = np.where(word[cp] if normalise else ~space[cp], cp, np.uint32(_SPACE)).astype(np.uint32)
    return cp.tobytes().decode("utf-32-le", "surrogatepass").split("\x01")


def _batch_bytes(texts: Sequence[str], normalise: bool) -> np.ndarray:
    """The batch joined by \\x01, normalised or not, as UTF-8 bytes: words are runs of bytes other than space and \\x01.

    One `bytes.translate` does the ASCII part; the (usually few) non-ASCII texts are done
    first by `_unicode_normalised`. A word has the same bytes, hence the same hash, whichever
    path its text took.
    """
    texts = list(texts)
    if sum(t.count("\x01") for t in texts):
        texts = [t.replace("\x01", " ") for t in texts]
    other = [i for i, t in enumerate(texts) if not t.isascii()]  # isascii is O(1) on str
    if other:
        for i, t in zip(other, _unicode_normalised([texts[i] for i in other], normalise), strict=True):
            texts[i] = t
    data = "\x01".join(texts).encode("utf-8", "surrogatepass")
    return np.frombuffer(data.translate(_NORMALISE if normalise else _WHITESPACE), dtype=np.uint8)


def _word_hashes(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The hash of every word of a batch, and the number of words in each of its documents.

    A word's hash mixes its bytes 8 at a time, read as little-endian u64s straight out of the
    buffer (an unaligned strided view), so the cost is per word, not per byte.
    """
    is_word = np.zeros(len(data) + 2, dtype=bool)  # padded with a non-word byte either side
    np.logical_and(data != _SPACE, data != _SEP, out=is_word[1:-1])
    # word starts and ends alternate among the edges; bool arrays keep flatnonzero fast
    edges = np.flatnonzero(is_word[1:] != is_word[:-1])
    starts = edges[0::2]
    length = edges[1::2] - starts
    doc_ends = np.searchsorted(starts, np.flatnonzero(data == _SEP))  # first word after each separator
    counts = np.diff(np.concatenate([[0], doc_ends, [len(starts)]]))
    padded = np.concatenate([data, np.zeros(8, dtype=np.uint8)])
    # little-endian whatever the platform, so the hashes are too
    window = np.ndarray(shape=(len(data) + 1,), dtype=np.dtype("<u8"), buffer=padded, strides=(1,))
    h = window[starts] & _LEN_MASK[np.minimum(length, 8)]
    h ^= length.astype(_U64) * _U64(0x9E3779B97F4A7C15)
    fmix64(h)
    k, longer = 8, np.flatnonzero(length > 8)
    while len(longer):
        chunk = window[starts[longer] + k] & _LEN_MASK[np.minimum(length[longer] - k, 8)]
        h[longer] = fmix64(h[longer] * _U64(0xC2B2AE3D27D4EB4F) + chunk)
        k += 8
        longer = longer[length[longer] > k]
    return h, counts


def _shingles(
    words: np.ndarray, counts: np.ndarray, ngram: int, mult: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Shingle hashes (CSR by document) from word hashes; a doc with < ngram words is one shingle."""
    offsets = np.concatenate([[0], np.cumsum(np.where(counts >= ngram, counts - ngram + 1, 1))])
    first = np.cumsum(counts) - counts
    short = np.flatnonzero(counts < ngram)
    n_pos = len(words) - ngram + 1
    h = np.empty(0, dtype=_U64)
    if n_pos > 0:
        # a seeded linear mix of the word hashes: word order matters, as it does in the text
        h = words[:n_pos] * mult[0]
        for k in range(1, ngram):
            h += words[k : k + n_pos] * mult[k]
        # drop the shingles that straddle a document boundary (all those of short documents)
        valid = np.ones(n_pos, dtype=bool)
        for k in range(1, ngram):
            at = first[1:] - k
            valid[at[(at >= 0) & (at < n_pos)]] = False
        h = fmix64(h[valid])
    if not len(short):  # the usual case: the shingles are already in place
        return h, offsets
    out = np.empty(int(offsets[-1]), dtype=_U64)
    in_long = np.ones(len(out), dtype=bool)
    in_long[offsets[short]] = False
    out[in_long] = h
    # a short text's one shingle is all of it; the length term keeps "a" apart from ""
    h = counts[short].astype(_U64) * mult[ngram]
    for k in range(ngram - 1):
        has = counts[short] > k
        h[has] += words[first[short[has]] + k] * mult[k]
    out[offsets[short]] = fmix64(h)
    return out, offsets


def shingle_hashes(
    texts: Sequence[str], ngram: int, seed: int, *, normalise: bool = True
) -> tuple[np.ndarray, np.ndarray]:
    """u64 hashes of the word `ngram`-shingles of each text, as (flat, offsets).

    Document i's shingles are flat[offsets[i]:offsets[i+1]]: never empty (a text with fewer
    than `ngram` words is one shingle, all of it), possibly repeating. With `normalise` the
    words are those of `normalise(text)`, else those of `text.split()` (\\x01, the batch
    separator, also splitting). The same text, ngram and seed give the same hashes whatever
    batch the text is in.
    """
    mult = _seeded_odd(seed, 2, ngram + 1)
    flats, offs, shift = [np.empty(0, dtype=_U64)], [np.zeros(1, dtype=np.int64)], 0
    for a, b in _batches(texts):
        words, counts = _word_hashes(_batch_bytes(texts[a:b], normalise))
        flat, off = _shingles(words, counts, ngram, mult)
        flats.append(flat)
        offs.append(off[1:] + shift)
        shift += len(flat)
    return np.concatenate(flats), np.concatenate(offs)


def gather(flat: np.ndarray, offsets: np.ndarray, docs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The CSR rows `docs` of (flat, offsets), as a new (flat, offsets)."""
    lengths = offsets[docs + 1] - offsets[docs]
    starts = np.repeat(offsets[docs], lengths)
    return flat[starts + _ragged_arange(lengths)], np.concatenate([[0], np.cumsum(lengths)])


def _digest(flat: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int) -> rensa.RMinHashDigestMatrix:
    return rensa.RMinHash.digest_matrix_from_flat_token_hashes(flat, offsets.astype(_U64), num_perm, seed)


def signatures(
    flat: np.ndarray, offsets: np.ndarray, num_perm: int, seed: int, docs: np.ndarray | None = None
) -> np.ndarray:
    """(len(docs), num_perm) uint32 R-MinHash signatures of the shingle sets of `docs` (default all)."""
    if docs is not None:
        flat, offsets = gather(flat, offsets, docs)
    n = len(offsets) - 1
    out = np.empty((n, num_perm), dtype=np.uint32)
    step = 16384
    for a in range(0, n, step):
        b = min(a + step, n)
        rows = offsets[a : b + 1]
        m = _digest(flat[rows[0] : rows[-1]], rows - rows[0], num_perm, seed)
        out[a:b] = np.array(m.to_rows(), dtype=np.uint32)
    return out


@functools.lru_cache(maxsize=256)
def optimal_bands(threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> tuple[int, int]:
    """(bands, rows) with bands * rows <= num_perm minimising the weighted FP + FN areas.

    datasketch's `_optimal_param` objective: the area under the LSH S-curve
    1 - (1 - s**r)**b below the threshold (pairs made candidates wrongly) plus the area
    above it over the threshold (pairs missed), here integrated with the trapezoid rule.
    """
    lo = np.linspace(0.0, threshold, 1001)
    hi = np.linspace(threshold, 1.0, 1001)
    best, best_err = (1, 1), np.inf
    for b in range(1, num_perm + 1):
        r = np.arange(1, num_perm // b + 1, dtype=np.float64)[:, None]
        fp = np.trapezoid(1 - (1 - lo**r) ** b, lo, axis=1)
        fn = np.trapezoid((1 - hi**r) ** b, hi, axis=1)
        err = fp_weight * fp + fn_weight * fn
        k = int(np.argmin(err))
        if err[k] < best_err:
            best, best_err = (b, k + 1), float(err[k])
    return best


def _ragged_arange(lengths: np.ndarray) -> np.ndarray:
    """concatenate([arange(n) for n in lengths]) without a Python loop."""
    starts = np.repeat(np.cumsum(lengths) - lengths, lengths)
    return np.arange(int(lengths.sum()), dtype=np.int64) - starts


def candidate_pairs(sig: np.ndarray, bands: int, rows: int, max_bucket: int = 64) -> np.ndarray:
    """Distinct (i, j), i < j, whose signatures agree on all `rows` slots of a band; shape (k, 2).

    Band b is columns [b*rows, (b+1)*rows). A bucket of up to `max_bucket` documents gives all
    its pairs; a larger one (a template copied many times) gives each member paired with the
    bucket's first and with its predecessor: enough to connect the cluster without a
    quadratic number of pairs.
    """
    n = sig.shape[0]
    if n < 2:
        return np.empty((0, 2), dtype=np.int64)
    mult = _seeded_odd(0, 3, rows)
    found = [np.empty((0, 2), dtype=np.int64)]
    for band in range(bands):
        cols = sig[:, band * rows : (band + 1) * rows].astype(_U64)
        key = cols[:, 0] * mult[0]
        for k in range(1, rows):
            key += cols[:, k] * mult[k]
        fmix64(key)
        order = np.argsort(key, kind="stable")  # stable: a bucket's members stay in index order
        skey = key[order]
        new = np.concatenate([[True], skey[1:] != skey[:-1]])
        gid = np.cumsum(new) - 1
        gstart = np.flatnonzero(new)
        size = np.diff(np.append(gstart, n))[gid]
        rank = np.arange(n) - gstart[gid]
        small = (size <= max_bucket) & (rank > 0)
        reps = rank[small]
        earlier = order[np.repeat(gstart[gid[small]], reps) + _ragged_arange(reps)]
        found.append(np.stack([earlier, np.repeat(order[small], reps)], 1))
        big = np.flatnonzero((size > max_bucket) & (rank > 0))
        found.append(np.stack([order[gstart[gid[big]]], order[big]], 1))
        found.append(np.stack([order[big - 1], order[big]], 1))
    pairs = np.concatenate(found)
    pairs.sort(axis=1)
    code = np.unique(pairs[:, 0] * np.int64(n) + pairs[:, 1])
    return np.stack([code // n, code % n], 1)


@dataclass(frozen=True)
class Candidates:
    """LSH candidates: `pairs` (k, 2) of document indices, i < j, sorted; `docs`, the sorted
    documents that share a band with another; `sig`, their (len(docs), bands * rows) signatures."""

    pairs: np.ndarray
    docs: np.ndarray
    sig: np.ndarray

    def local(self) -> np.ndarray:
        """`pairs` as row indices into `sig`."""
        return np.searchsorted(self.docs, self.pairs)


def lsh_candidates(flat: np.ndarray, offsets: np.ndarray, bands: int, rows: int, seed: int) -> Candidates:
    """Candidate pairs of a `bands` x `rows` LSH over R-MinHash signatures of bands * rows slots.

    rensa flags the documents that share some band with another; only those are copied out
    and banded again in numpy to list the pairs.
    """
    n, num_perm = len(offsets) - 1, bands * rows
    none = Candidates(np.empty((0, 2), np.int64), np.empty(0, np.int64), np.empty((0, num_perm), np.uint32))
    if n < 2:
        return none
    matrix = _digest(flat, offsets, num_perm, seed)
    # the threshold argument only matters to rensa's own similarity checks, not to the flags
    flags = rensa.RMinHashLSH(0.5, num_perm, bands).query_duplicate_flags_matrix_one_shot(matrix)
    docs = np.flatnonzero(np.fromiter(flags, dtype=bool, count=n))
    if len(docs) < 2:
        return none
    sig = signatures(flat, offsets, num_perm, seed, docs)
    return Candidates(docs[candidate_pairs(sig, bands, rows)], docs, sig)


def signature_jaccard(sig: np.ndarray, pairs: np.ndarray, chunk: int = 65536) -> np.ndarray:
    """Estimated Jaccard of each pair of rows of `sig`: the fraction of equal slots."""
    out = np.empty(len(pairs), dtype=np.float64)
    for a in range(0, len(pairs), chunk):
        p = pairs[a : a + chunk]
        out[a : a + chunk] = (sig[p[:, 0]] == sig[p[:, 1]]).mean(axis=1)
    return out


def exact_jaccard(flat: np.ndarray, offsets: np.ndarray, pairs: np.ndarray) -> np.ndarray:
    """Exact Jaccard of each pair's shingle sets."""
    out = np.empty(len(pairs), dtype=np.float64)
    sets: dict[int, np.ndarray] = {}

    def shingle_set(i: int) -> np.ndarray:
        s = sets.get(i)
        if s is None:
            s = sets[i] = np.unique(flat[offsets[i] : offsets[i + 1]])
        return s

    for k, (i, j) in enumerate(pairs.tolist()):
        a, b = shingle_set(i), shingle_set(j)
        inter = len(np.intersect1d(a, b, assume_unique=True))
        out[k] = inter / (len(a) + len(b) - inter)
    return out


def components(n: int, pairs: np.ndarray) -> np.ndarray:
    """Union-find over `pairs`: for each of n nodes, the lowest index in its connected component.

    Vectorised: every root hooks onto the smallest root it shares an edge with, then paths
    are compressed by pointer jumping. Parents only ever point to smaller indices, so a
    component's final root is its lowest index, whatever the order of the pairs.
    """
    parent = np.arange(n, dtype=np.int64)
    a, b = pairs[:, 0], pairs[:, 1]
    while True:
        ra, rb = parent[a], parent[b]
        diff = ra != rb
        if not diff.any():
            return parent
        np.minimum.at(parent, np.maximum(ra[diff], rb[diff]), np.minimum(ra[diff], rb[diff]))
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                break
            parent = nxt
