"""Mixing sources to target shares, measured in bytes or in tokens of a reference tokenizer.

Each source contributes `share * total` units to the train split. Documents are drawn
in a seeded random order per source; a source with too little data is repeated for up to
`max_epochs` passes (each pass a fresh permutation), and whatever is still missing shows
as achieved share < target share in the metrics — never silently.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import field_validator, model_validator

from ..config import Config
from .sources import Document


class MixingConfig(Config):
    unit: Literal["bytes", "tokens"] = "bytes"
    reference_tokenizer: str | None = None  # a tokenizer.json; required for unit: tokens
    total: int | None = None  # train budget in `unit`; None = the most that needs no repetition
    max_epochs: int = 1  # with a `total`, a scarce source may be repeated up to this many passes

    @field_validator("max_epochs")
    @classmethod
    def _epochs(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be >= 1")
        return v

    @model_validator(mode="after")
    def _tokens_need_tokenizer(self) -> MixingConfig:
        if self.unit == "tokens" and not self.reference_tokenizer:
            raise ValueError("unit: tokens needs reference_tokenizer (path to a tokenizer.json)")
        if self.total is not None and self.total <= 0:
            raise ValueError("total must be positive (or null)")
        return self


class Sizer:
    """Measures documents in the configured unit."""

    def __init__(self, cfg: MixingConfig):
        self.unit = cfg.unit
        self._tok = None
        if cfg.unit == "tokens":
            from tokenizers import Tokenizer

            from ..errors import InputError

            try:
                self._tok = Tokenizer.from_file(str(cfg.reference_tokenizer))
            except Exception as e:  # tokenizers raises plain Exception for a bad file
                raise InputError(str(cfg.reference_tokenizer), f"cannot load reference tokenizer: {e}",
                                 fix="point mix.mixing.reference_tokenizer at a HF tokenizer.json") from None

    def sizes(self, texts: Sequence[str]) -> list[int]:
        if self._tok is None:
            return [len(t.encode("utf-8")) for t in texts]
        return [len(e.ids) for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]


@dataclass(frozen=True)
class Draw:
    doc: Document
    epoch: int  # 0 for the first pass; repeats get a distinct row id


@dataclass(frozen=True)
class SourceDraw:
    draws: list[Draw]
    available: int
    selected: int
    target: float
    epochs: int


def budget(available: dict[str, int], shares: dict[str, float], total: int | None) -> float:
    """The train total: as given, or the largest every source can fill without repeating."""
    if total is not None:
        return float(total)
    return min(available[s] / shares[s] for s in shares)


def draw_source(
    docs: list[Document], sizes: list[int], target: float, max_epochs: int, seed: int, source_index: int
) -> SourceDraw:
    """Take documents in a seeded order until `target` units are reached (to the nearest doc)."""
    draws: list[Draw] = []
    got = 0
    for epoch in range(max_epochs):
        order = np.random.default_rng([seed, source_index, epoch]).permutation(len(docs))
        for i in order:
            if got + sizes[i] / 2 > target:  # include a doc only if that lands nearer the target
                return SourceDraw(draws, sum(sizes), got, target, _passes(draws))
            draws.append(Draw(docs[int(i)], epoch))
            got += sizes[i]
    return SourceDraw(draws, sum(sizes), got, target, _passes(draws))


def _passes(draws: list[Draw]) -> int:
    return max((d.epoch for d in draws), default=-1) + 1


def shuffle(draws: list[Draw], seed: int) -> list[Draw]:
    order = np.random.default_rng([seed, 0x5EED]).permutation(len(draws))
    return [draws[i] for i in order]
