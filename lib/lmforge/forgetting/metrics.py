"""GEM's continual-learning metrics (Lopez-Paz & Ranzato, 2017) of a score matrix.

`R[i][j]` is the score on domain j after training on domains 0..i in order (higher is better:
next-token accuracy, or minus the loss), and `b[j]` the score of the model before any of them.
With T domains:

    ACC = 1/T       sum_j        R[T-1][j]              final score, averaged over domains
    BWT = 1/(T-1)   sum_{j<T-1}  R[T-1][j] - R[j][j]    what later domains did to earlier ones
                                                         (negative: forgetting)
    FWT = 1/(T-1)   sum_{j>0}    R[j-1][j] - b[j]       what earlier domains did for a domain
                                                         before it was trained on
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(R: np.ndarray, b: np.ndarray) -> int:
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 2:
        raise ValueError(f"R must be a square matrix of at least 2 x 2 (got shape {R.shape})")
    if b.shape != (R.shape[0],):
        raise ValueError(f"b must have one score per domain ({R.shape[0]}), got shape {b.shape}")
    return R.shape[0]


def acc(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    R = np.asarray(R, dtype=np.float64)
    _check(R, np.zeros(len(R)))
    return float(R[-1].mean())


def bwt(R: Sequence[Sequence[float]] | np.ndarray) -> float:
    R = np.asarray(R, dtype=np.float64)
    T = _check(R, np.zeros(len(R)))
    return float(np.mean([R[T - 1, j] - R[j, j] for j in range(T - 1)]))


def fwt(R: Sequence[Sequence[float]] | np.ndarray, b: Sequence[float] | np.ndarray) -> float:
    R, b = np.asarray(R, dtype=np.float64), np.asarray(b, dtype=np.float64)
    T = _check(R, b)
    return float(np.mean([R[j - 1, j] - b[j] for j in range(1, T)]))


def gem(R: Sequence[Sequence[float]] | np.ndarray, b: Sequence[float] | np.ndarray) -> dict[str, float]:
    """ACC, BWT and FWT of one run."""
    return {"acc": acc(R), "bwt": bwt(R), "fwt": fwt(R, b)}


def mean_std(values: Sequence[float]) -> dict[str, float]:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) over seeds."""
    v = np.asarray(values, dtype=np.float64)
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else 0.0}


def summarise(runs: Sequence[dict[str, float]]) -> dict[str, dict[str, float]]:
    """{metric: {mean, std}} over runs (seeds) of `gem` results."""
    return {k: mean_std([r[k] for r in runs]) for k in runs[0]}
