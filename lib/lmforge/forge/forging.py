"""Training a batch of facts into weights, through the one training loop (lmforge.train.loop).

    delta = forge(model, enc, facts, anchors, cfg, dist=dist, seed=3)           # base frozen
    lora = forge(model, enc, facts, [], cfg.replace(kl_weight=0), ...)          # the plain-LoRA baseline
    tuned = finetune(model, enc, facts, cfg, dist=dist)                          # full fine-tune baseline

Rows are BOS + a training-template prompt + the object; only the object's tokens are targets.
A delta's objective adds, on *anchor* rows (unrelated prompts), the KL divergence from the
frozen base's next-token distribution at every position, `kl_weight` per anchor position (as
much as one object token): it keeps the delta from moving what it was not asked to move.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from ..config import Config
from ..train import loop
from ..train.config import TrainConfig
from ..train.dist import Dist
from .delta import Adapted, Delta, targets
from .evaluate import encode, pad
from .facts import Fact


class DeltaConfig(Config):
    rank: int = Field(16, ge=1)
    alpha: float = Field(32.0, gt=0)
    layers: list[int] | None = None      # null: the middle band (lmforge.forge.delta.middle_band)
    projections: list[str] = Field(["gate_proj", "up_proj", "down_proj"], min_length=1)
    kl_weight: float = Field(1.0, ge=0)              # anchor KL per position, relative to one object token
    anchor_fraction: float = Field(0.25, ge=0, lt=1)  # share of each batch's rows that are anchors


class FactRows:
    """The loop's data: each step `global_batch` rows, `anchor_fraction` of them anchors, the
    rest fact rows, both drawn without replacement in epochs from a seeded permutation."""

    def __init__(self, facts: np.ndarray, targets: np.ndarray, anchors: np.ndarray, anchor_fraction: float, *,
                 seed: int, rank: int = 0, world: int = 1):
        width = max(facts.shape[1], anchors.shape[1] if len(anchors) else 0)
        self.facts, self.targets = _widen(facts, width, 0), _widen(targets, width, -1)
        self.anchors = _widen(anchors, width, 0) if len(anchors) else np.zeros((0, width), dtype=np.int64)
        self.anchor_fraction = anchor_fraction if len(anchors) else 0.0
        self.seed, self.rank, self.world = seed, rank, world
        self.drawn = {"facts": 0, "anchors": 0}

    def _draw(self, which: str, n: int) -> np.ndarray:
        total = len(self.facts if which == "facts" else self.anchors)
        idx = []
        for k in range(self.drawn[which], self.drawn[which] + n):
            epoch, pos = divmod(k, total)
            idx.append(np.random.default_rng([self.seed, epoch, which == "facts"]).permutation(total)[pos])
        self.drawn[which] += n
        return np.array(idx, dtype=np.int64)

    def next_step(self, global_batch: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
        k = round(self.anchor_fraction * global_batch)
        f, a = self._draw("facts", global_batch - k), self._draw("anchors", k) if k else np.zeros(0, np.int64)
        rows = np.concatenate([self.facts[f], self.anchors[a]])
        tgt = np.concatenate([self.targets[f], np.full((k, rows.shape[1]), -1)])
        anchor = np.concatenate([np.zeros((len(f), rows.shape[1]), bool), self.anchors[a] != 0])
        anchor[:, 0] = anchor[:, 0] | (np.arange(len(rows)) >= len(f))  # BOS (id 0) is an anchor position too
        per = global_batch // self.world
        mine = slice(self.rank * per, (self.rank + 1) * per)
        x, y, m = (torch.from_numpy(v[mine]) for v in (rows, tgt, anchor))
        return [{"inputs": xi[:, :-1], "targets": yi[:, 1:], "anchor": mi[:, :-1]}
                for xi, yi, mi in zip(x.split(micro_batch), y.split(micro_batch), m.split(micro_batch), strict=True)]

    def state_dict(self) -> dict[str, Any]:
        return dict(self.drawn)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.drawn = {"facts": int(state["facts"]), "anchors": int(state["anchors"])}


def _widen(a: np.ndarray, width: int, fill: int) -> np.ndarray:
    if a.shape[1] >= width:
        return a
    return np.concatenate([a, np.full((len(a), width - a.shape[1]), fill, dtype=a.dtype)], axis=1)


def fact_rows(enc: tiktoken.Encoding, facts: Sequence[Fact]) -> tuple[np.ndarray, np.ndarray]:
    """Token rows of every (fact, training template), and their targets (-1 but the object)."""
    seqs, tgts = [], []
    for f in facts:
        for p in f.prompts():
            seq, n = encode(enc, p, f.target)
            seqs.append(seq)
            tgts.append([-1] * n + seq[n:])
    rows = pad(seqs)
    return rows, _pad_targets(tgts, rows.shape[1])


def _pad_targets(tgts: list[list[int]], width: int) -> np.ndarray:
    out = np.full((len(tgts), width), -1, dtype=np.int64)
    for i, t in enumerate(tgts):
        out[i, :len(t)] = t
    return out


def anchor_rows(enc: tiktoken.Encoding, prompts: Sequence[str]) -> np.ndarray:
    return pad([encode(enc, p)[0] for p in prompts]) if prompts else np.zeros((0, 1), dtype=np.int64)


def objective(kl_weight: float) -> loop.Objective:
    def count(batch: loop.Batch) -> int:
        return int((batch["targets"] != -1).sum())

    def loss(net: nn.Module, batch: loop.Batch) -> torch.Tensor:
        x, y, anchor = batch["inputs"], batch["targets"], batch["anchor"]
        logits = net(x).float()
        total = F.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1, reduction="sum")
        if kl_weight > 0 and bool(anchor.any()):
            base = getattr(net, "module", net).base  # under DDP the Adapted model is net.module
            with torch.no_grad():
                ref = F.log_softmax(base(x).float(), dim=-1)[anchor]
            cur = F.log_softmax(logits, dim=-1)[anchor]
            total = total + kl_weight * F.kl_div(cur, ref, log_target=True, reduction="sum")
        return total
    return loop.Objective("facts", loss, count)


def _data(enc: tiktoken.Encoding, facts: Sequence[Fact], anchors: Sequence[str], fraction: float, seed: int,
          dist: Dist) -> FactRows:
    rows, tgts = fact_rows(enc, facts)
    return FactRows(rows, tgts, anchor_rows(enc, anchors), fraction, seed=seed, rank=dist.rank, world=dist.world)


def forge(model: nn.Module, enc: tiktoken.Encoding, facts: Sequence[Fact], anchors: Sequence[str], cfg: DeltaConfig,
          train: TrainConfig, *, dist: Dist, seed: int, ckpt_dir: Path | None = None,
          log: loop.Log | None = None, init: Delta | None = None) -> tuple[Delta, loop.Result]:
    """One delta for `facts` on the frozen `model` (its weights are not touched); trained from
    `init` (a copy of it) when given, e.g. a consolidated delta being repaired."""
    if init is not None:
        delta = Delta.from_tensors(init.tensors(), init.rank, init.alpha).requires_grad_(True)
    else:
        delta = Delta.new(model, targets(model, cfg.layers, cfg.projections), rank=cfg.rank, alpha=cfg.alpha,
                          seed=seed)
    net = Adapted(model, delta)
    data = _data(enc, facts, anchors if cfg.kl_weight > 0 else [], cfg.anchor_fraction, seed, dist)
    torch.manual_seed(seed)
    res = loop.fit(net, objective(cfg.kl_weight), data, train, dist=dist, total_steps=train.total_steps(0),
                   d_model=model.config.d_model, ckpt_dir=ckpt_dir, log=log)
    model.eval()
    return delta.requires_grad_(False).eval(), res


def finetune(model: nn.Module, enc: tiktoken.Encoding, facts: Sequence[Fact], train: TrainConfig, *, dist: Dist,
             seed: int, ckpt_dir: Path | None = None, log: loop.Log | None = None) -> tuple[nn.Module, loop.Result]:
    """Every weight trained on the facts (a copy: `model` is not touched)."""
    tuned = copy.deepcopy(model).requires_grad_(True)
    data = _data(enc, facts, [], 0.0, seed, dist)
    torch.manual_seed(seed)
    res = loop.fit(tuned, objective(0.0), data, train, dist=dist, total_steps=train.total_steps(0),
                   d_model=model.config.d_model, ckpt_dir=ckpt_dir, log=log)
    return tuned.requires_grad_(False).eval(), res
