"""Consolidation: several deltas of one category merged into one by truncated SVD.

    merged, report = merge([d1, d2, d3], rank=32)

Per module, the summed weight delta sum_i (alpha_i / r_i) B_i A_i is factored by SVD and cut to
`rank`: B = U_r sqrt(S_r), A = sqrt(S_r) V_r^T, alpha = rank (scale 1), the best rank-`rank`
approximation in the Frobenius norm. `report["error"]` is the relative Frobenius error of the
cut, per module. The merged delta frees (sum of ranks - rank) per module; it only replaces the
originals after it passes the same validation gate (lmforge.forge.stage).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .delta import Delta


def merge(deltas: Sequence[Delta], rank: int) -> tuple[Delta, dict[str, Any]]:
    if not deltas:
        raise ValueError("nothing to consolidate")
    names = sorted({n for d in deltas for n in d.names})
    tensors: dict[str, torch.Tensor] = {}
    error = {}
    for n in names:
        total = sum(d.weight_delta(n).detach().double() for d in deltas if n in d.names)
        u, s, vh = torch.linalg.svd(total, full_matrices=False)
        r = min(rank, len(s))
        root = s[:r].sqrt()
        b = torch.zeros(total.shape[0], rank, dtype=torch.float64)
        a = torch.zeros(rank, total.shape[1], dtype=torch.float64)
        b[:, :r], a[:r] = u[:, :r] * root, root[:, None] * vh[:r]
        tensors[f"{n}.lora_A"], tensors[f"{n}.lora_B"] = a.float(), b.float()
        norm = float(total.norm())
        error[n] = round(float((total - b @ a).norm()) / norm, 6) if norm else 0.0
    merged = Delta.from_tensors(tensors, rank, float(rank))
    return merged, {"rank": rank, "from_ranks": sum(d.rank for d in deltas), "error": error}
