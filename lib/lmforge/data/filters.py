"""Quality filters. Each returns the reason a document is dropped, or None to keep it.

Reasons are stable strings counted per source in the stage metrics and recorded per
document in `dropped.parquet`:
- too_short / too_long: character length outside [min_chars, max_chars];
- repetitive_lines: the share of characters in lines that occur more than once exceeds
  max_dup_line_frac (Gopher's duplicate-line filter; blank and 1-2 character lines ignored);
- repetitive_ngrams: the most frequent word 3-gram covers more than max_top_ngram_frac of
  the words (catches "buy now buy now ..." spam);
- non_text: the share of characters that are neither letters, digits, whitespace nor
  punctuation (ASCII, or Unicode category P*) exceeds max_non_text_frac (binary junk, box drawing, emoji walls), or the
  document has no letter or digit at all.
"""

from __future__ import annotations

import string
import unicodedata
from collections import Counter

from pydantic import model_validator

from ..config import Config

_PUNCT = frozenset(string.punctuation)
REASONS = ("too_short", "too_long", "repetitive_lines", "repetitive_ngrams", "non_text")


class FilterConfig(Config):
    min_chars: int = 200
    max_chars: int = 100_000
    max_dup_line_frac: float = 0.3
    max_top_ngram_frac: float = 0.2
    max_non_text_frac: float = 0.2

    @model_validator(mode="after")
    def _bounds(self) -> FilterConfig:
        if not 1 <= self.min_chars < self.max_chars:
            raise ValueError("need 1 <= min_chars < max_chars")
        for k in ("max_dup_line_frac", "max_top_ngram_frac", "max_non_text_frac"):
            if not 0 < getattr(self, k) <= 1:
                raise ValueError(f"{k} must be in (0, 1]")
        return self


def dup_line_frac(text: str) -> float:
    lines = [ln.strip() for ln in text.split("\n")]
    lines = [ln for ln in lines if len(ln) > 2]
    total = sum(len(ln) for ln in lines)
    if not total:
        return 0.0
    counts = Counter(lines)
    return sum(len(ln) for ln in lines if counts[ln] > 1) / total


def top_ngram_frac(text: str, n: int = 3) -> float:
    words = text.lower().split()
    if len(words) < n * 4:  # too short for the statistic to mean anything
        return 0.0
    grams = Counter(zip(*(words[i:] for i in range(n)), strict=False))
    gram, count = grams.most_common(1)[0]
    # overlapping repeats ("a a a a") could count a word twice: capped at all of the text
    return min(1.0, count * sum(len(w) for w in gram) / sum(len(w) for w in words))


def _is_text(c: str) -> bool:
    # punctuation in any script (curly quotes, dashes, CJK full stops) is text too
    return c.isalnum() or c.isspace() or c in _PUNCT or (c > "\x7f" and unicodedata.category(c)[0] == "P")


def non_text_frac(text: str) -> float:
    if not text:
        return 0.0
    return sum(1 for c in text if not _is_text(c)) / len(text)


def reason_to_drop(text: str, cfg: FilterConfig) -> str | None:
    n = len(text)
    if n < cfg.min_chars:
        return "too_short"
    if n > cfg.max_chars:
        return "too_long"
    if non_text_frac(text) > cfg.max_non_text_frac or not any(c.isalnum() for c in text):
        return "non_text"
    if dup_line_frac(text) > cfg.max_dup_line_frac:
        return "repetitive_lines"
    if top_ngram_frac(text) > cfg.max_top_ngram_frac:
        return "repetitive_ngrams"
    return None
