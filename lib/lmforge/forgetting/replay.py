"""Experience replay: earlier domains' rows blended into every batch (lmforge.train.data.Blend).

Each step's global batch is `fraction` new rows short (rounded); that many rows come from the
memories of the earlier domains instead, spread over the domains as evenly as the count allows
(the remainder rotates from step to step), each row drawn uniformly from its domain's memory.
A domain's memory is the first `memory_rows` rows it was trained on (an episodic memory, as in
GEM). Which rows are drawn is a function of (seed, step) only, so a resumed run draws the same.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..train.data import Blend, PackedRows


def split_counts(n: int, domains: int, step: int) -> list[int]:
    """`n` replay rows over `domains` memories: n // domains each, the remainder to the domains
    after `step mod domains` (so over `domains` steps every domain gets the same number)."""
    base, extra = divmod(n, domains)
    first = step % domains
    return [base + (1 if (d - first) % domains < extra else 0) for d in range(domains)]


class Memories:
    """Rows drawn from several domains' memories, balanced over the domains (a `Rows` source)."""

    def __init__(self, memories: list[np.ndarray], seed: int):
        if not memories:
            raise ValueError("replay needs at least one memory")
        self.memories, self.seed, self.calls = memories, seed, 0

    def take(self, count: int) -> np.ndarray:
        rng = np.random.default_rng([self.seed, self.calls])
        parts = [self.memories[d][rng.integers(0, len(self.memories[d]), size=k)]
                 for d, k in enumerate(split_counts(count, len(self.memories), self.calls))]
        self.calls += 1
        return np.concatenate(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])


def replay(current: PackedRows, memories: list[np.ndarray], fraction: float, seed: int) -> PackedRows | Blend:
    """The current domain's rows with `fraction` of each batch from `memories` (none: the domain alone)."""
    return Blend(current, Memories(memories, seed), fraction, seed=seed) if memories and fraction > 0 else current
