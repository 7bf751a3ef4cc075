"""The persistence-weighted loss (the "fractal loss" idea) as an objective of the one loop.

Each target token's cross-entropy is reweighted by how the model itself rates that token. With
p_t the model's probability of the target and p*_t its probability of its own top choice at that
position (both detached: the weights carry no gradient),

    R_t = p_t / p*_t                                   in (0, 1]; 1 when the target is the top choice
    w_t = 1 + persist * R_t^power + push * (1 - R_t)^power
    L   = sum_t (w_t / mean_s w_s) * CE_t              (weights renormalised to mean 1 per micro-batch)

- `persist`: extra weight on tokens the model already predicts as its top choice, so that what
  it knows keeps a strong say in every update and resists being overwritten;
- `push`: extra weight on tokens it under-predicts (R_t near 0), which are learned harder;
- `power` (>= 1): how sharply the weights concentrate on the two ends; tokens the model is
  unsure about (R_t near 1/2) keep weight near 1 before renormalisation.

Renormalising keeps the loss on the scale of plain cross-entropy, so the learning rate means the
same thing; persist = push = 0 is plain cross-entropy exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import Config
from ..train.loop import LM, Batch, Objective


class PersistenceConfig(Config):
    persist: float = 1.0
    push: float = 1.0
    power: float = 2.0


def weights(logits: torch.Tensor, targets: torch.Tensor, cfg: PersistenceConfig) -> torch.Tensor:
    """w_t / mean(w) for every position (0 where the target is -1)."""
    with torch.no_grad():
        logp = F.log_softmax(logits.float(), dim=-1)
        counted = targets != -1
        target_logp = logp.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        ratio = torch.exp(target_logp - logp.max(dim=-1).values)
        w = 1.0 + cfg.persist * ratio.pow(cfg.power) + cfg.push * (1.0 - ratio).pow(cfg.power)
        w = torch.where(counted, w, torch.zeros_like(w))
        return w * (counted.sum() / w.sum().clamp(min=1e-12))


def objective(cfg: PersistenceConfig) -> Objective:
    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        logits = model(batch["inputs"])
        ce = F.cross_entropy(logits.float().flatten(0, 1), batch["targets"].flatten(), ignore_index=-1,
                             reduction="none").view_as(batch["targets"])
        return (weights(logits, batch["targets"], cfg) * ce).sum()

    return Objective("persistence", loss, LM.count)
