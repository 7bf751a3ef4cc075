"""Experience replay as a data source of the one training loop.

Each step's global batch is `fraction` new rows short (rounded): that many rows come from the
memories of the earlier domains instead, spread over the domains as evenly as the count allows
(the remainder rotates from step to step), each row drawn uniformly from its domain's memory.
The rows of a step are then shuffled, so every micro-batch mixes old and new. A domain's memory
is the first `memory_rows` rows it was trained on (an episodic memory, as in GEM).
Which rows are drawn is a function of (seed, step) only, so a resumed run draws the same ones.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..train.data import PackedRows


def split_counts(n: int, domains: int, step: int) -> list[int]:
    """`n` replay rows over `domains` memories: n // domains each, the remainder to the domains
    after `step mod domains` (so over `domains` steps every domain gets the same number)."""
    base, extra = divmod(n, domains)
    first = step % domains
    return [base + (1 if (d - first) % domains < extra else 0) for d in range(domains)]


class Replay:
    def __init__(self, current: PackedRows, memories: list[np.ndarray], fraction: float, seed: int):
        if not 0.0 <= fraction < 1.0:
            raise ValueError(f"replay fraction must be in [0, 1) (got {fraction})")
        self.current, self.memories, self.fraction, self.seed = current, memories, fraction, seed
        self.step = 0
        self.last_sources: np.ndarray = np.zeros(0, dtype=np.int64)  # domain of every row of the last step (-1: new)

    def replayed(self, global_batch: int) -> int:
        return round(self.fraction * global_batch) if self.memories else 0

    def next_step(self, global_batch: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
        if global_batch % micro_batch:
            raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch {micro_batch}")
        rng = np.random.default_rng([self.seed, self.step])
        n_old = self.replayed(global_batch)
        parts, sources = [self.current.take(global_batch - n_old)], [np.full(global_batch - n_old, -1)]
        if n_old:
            for d, k in enumerate(split_counts(n_old, len(self.memories), self.step)):
                parts.append(self.memories[d][rng.integers(0, len(self.memories[d]), size=k)])
                sources.append(np.full(k, d))
        order = rng.permutation(global_batch)
        rows = torch.from_numpy(np.concatenate(parts)[order])
        self.last_sources = np.concatenate(sources)[order]
        self.step += 1
        return [{"inputs": r[:, :-1], "targets": r[:, 1:]} for r in rows.split(micro_batch)]

    def state_dict(self) -> dict[str, Any]:
        return {"current": self.current.state_dict(), "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.current.load_state_dict(state["current"])
        self.step = int(state["step"])
