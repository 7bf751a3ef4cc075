"""Elastic weight consolidation (Kirkpatrick et al., 2017) with a diagonal Fisher, as an
objective of the one training loop.

After training on a domain, `consolidate` stores the weights theta* and the diagonal of the
empirical Fisher there; training on later domains adds a quadratic penalty that pulls each
weight back towards theta* in proportion to its Fisher value:

    per_task:  L = CE + lambda/2 sum_k sum_i F_k,i (theta_i - theta*_k,i)^2     (one term per domain)
    online:    L = CE + lambda/2 sum_i F~_i (theta_i - theta*_i)^2,  F~ <- gamma F~ + F_k,
               theta* the weights after the latest domain (Schwarz et al., 2018)

The Fisher is the empirical one over sequences: F_i = mean_n (d l_n / d theta_i)^2, with l_n
the mean next-token loss of row n (so it does not grow with seq_len) and the gradient of each
row taken on its own. CE is the mean token loss, so lambda has the same meaning at any batch size.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
from torch import nn

from ..train.loop import LM, Batch, Objective


def diagonal_fisher(model: nn.Module, rows: np.ndarray, device: torch.device) -> dict[str, torch.Tensor]:
    """mean_n (grad of row n's mean token loss)^2 for every trainable tensor (float32)."""
    if len(rows) == 0:
        raise ValueError("the Fisher needs at least one row")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    was_training = model.training
    model.eval()
    for row in torch.from_numpy(np.asarray(rows, dtype=np.int64)).to(device):
        loss = model(row[None, :-1], row[None, 1:])
        for (name, _), g in zip(params.items(), torch.autograd.grad(loss, list(params.values())), strict=True):
            fisher[name] += g.float().square()
    model.train(was_training)
    return {n: f / len(rows) for n, f in fisher.items()}


class EWC:
    def __init__(self, lam: float, mode: Literal["per_task", "online"] = "per_task", gamma: float = 1.0):
        self.lam, self.mode, self.gamma = lam, mode, gamma
        self.anchors: list[tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]] = []  # (theta*, F)
        self.params: dict[str, nn.Parameter] = {}

    def consolidate(self, model: nn.Module, rows: np.ndarray, device: torch.device) -> None:
        """Remember the weights after a domain and their Fisher on `rows` of that domain."""
        fisher = diagonal_fisher(model, rows, device)
        self.params = {n: p for n, p in model.named_parameters() if n in fisher}
        star = {n: p.detach().float().clone() for n, p in self.params.items()}
        if self.mode == "online" and self.anchors:
            _, old = self.anchors[0]
            fisher = {n: self.gamma * old[n] + f for n, f in fisher.items()}
            self.anchors = []
        self.anchors.append((star, fisher))

    def penalty(self) -> torch.Tensor:
        total = torch.zeros((), device=next(iter(self.params.values())).device) if self.params else torch.zeros(())
        for star, fisher in self.anchors:
            for n, p in self.params.items():
                total = total + (fisher[n] * (p.float() - star[n]).square()).sum()
        return 0.5 * self.lam * total

    def objective(self) -> Objective:
        """CE plus the penalty; with nothing consolidated yet, plain CE."""
        def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
            ce = LM.loss(model, batch)
            # the loop divides by the step's counted targets: count x penalty adds it once per step
            return ce + self.penalty() * LM.count(batch) if self.anchors else ce

        return Objective(f"ewc_{self.mode}", loss, LM.count)
