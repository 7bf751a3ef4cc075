"""DPO (sigmoid loss, frozen reference) as an objective and a data source of the one training loop.

For a pair (prompt, chosen, rejected), with s(y) the summed log-probability of reply y's
tokens (and its <|assistant_end|>) under the policy and s_ref under the frozen reference:
    loss = -log sigmoid(beta * ((s(chosen) - s_ref(chosen)) - (s(rejected) - s_ref(rejected))))
which is log 2 when the policy is the reference (tested). With `nll_weight` > 0 (RPO, TRL's
`rpo_alpha`) the chosen reply's mean token negative log-likelihood is added, weighted: plain DPO
raises the margin partly by making the chosen reply less likely too, which on a small model
wrecks what it generates (bench/results/rl_dpo.md). The reference scores are computed once,
before training, by `PairBatches`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import tiktoken
import torch
import torch.nn.functional as F
from torch import nn

from ..chat import prompt_ids
from ..train.loop import Batch, Objective
from .grpo import END, rows, token_logps
from .pairs import Pair


def encode(enc: tiktoken.Encoding, pairs: Sequence[Pair]) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and targets of 2n rows: every pair's chosen reply, then every rejected one."""
    prompts = [prompt_ids(enc, p.prompt) for p in pairs]
    replies = [enc.encode_ordinary(p.chosen) + [END] for p in pairs] + [enc.encode_ordinary(p.rejected) + [END] for p in pairs]
    return rows(prompts + prompts, replies)


@torch.no_grad()
def reply_logps(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, micro_batch: int) -> torch.Tensor:
    """s(y) per row: the summed log-probability of the row's reply."""
    was = model.training
    model.eval()
    dev = next(model.parameters()).device
    out = torch.cat([token_logps(model, inputs[i:i + micro_batch].to(dev), targets[i:i + micro_batch].to(dev)).sum(1).cpu()
                     for i in range(0, len(inputs), micro_batch)])
    model.train(was)
    return out


def margin(model: nn.Module, enc: tiktoken.Encoding, pairs: Sequence[Pair], micro_batch: int) -> float:
    """Mean s(chosen) - s(rejected) over `pairs`: how much more likely the policy finds the right reply."""
    x, y = encode(enc, pairs)
    s = reply_logps(model, x, y, micro_batch)
    return float((s[:len(pairs)] - s[len(pairs):]).mean())


def chosen_logp(model: nn.Module, enc: tiktoken.Encoding, pairs: Sequence[Pair], micro_batch: int) -> float:
    """Mean s(chosen) over `pairs`: whether the right reply itself became more or less likely."""
    x, y = encode(enc, pairs)
    return float(reply_logps(model, x[:len(pairs)], y[:len(pairs)], micro_batch).mean())


def _loss(beta: float, nll_weight: float):  # type: ignore[no-untyped-def]
    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        logp = token_logps(model, batch["inputs"], batch["targets"])
        s = logp.sum(1) - batch["ref"]
        n = len(s) // 2
        out = -F.logsigmoid(beta * (s[:n] - s[n:])).sum()
        if nll_weight:
            counted = (batch["targets"][:n] != -1).sum(1).clamp(min=1)
            out = out - nll_weight * (logp[:n].sum(1) / counted).sum()
        return out
    return loss


def objective(*, beta: float, nll_weight: float = 0.0) -> Objective:
    return Objective("dpo", _loss(beta, nll_weight), lambda b: len(b["ref"]) // 2)


class PairBatches:
    """The loop's data source for DPO: pairs in a seeded order per epoch, resumable; each
    micro-batch holds its pairs' chosen rows, then their rejected rows, with reference scores."""

    def __init__(self, enc: tiktoken.Encoding, pairs: Sequence[Pair], ref: nn.Module, *, seed: int,
                 micro_batch: int, rank: int = 0, world: int = 1):
        self.x, self.y = encode(enc, pairs)
        self.ref_s = reply_logps(ref, self.x, self.y, micro_batch)
        self.n, self.seed, self.rank, self.world = len(pairs), seed, rank, world
        self.pos = 0

    def next_step(self, global_batch: int, micro_batch: int) -> list[Batch]:
        """`global_batch` pairs per step across processes, `micro_batch` pairs per forward."""
        if global_batch % (micro_batch * self.world):
            raise ValueError(f"global_batch {global_batch} is not a multiple of micro_batch x processes")
        idx = []
        for k in range(self.pos, self.pos + global_batch):
            order = np.random.default_rng([self.seed, k // self.n]).permutation(self.n)
            idx.append(int(order[k % self.n]))
        self.pos += global_batch
        per = global_batch // self.world
        mine = idx[self.rank * per:(self.rank + 1) * per]
        out = []
        for i in range(0, len(mine), micro_batch):
            rows_ = torch.tensor(mine[i:i + micro_batch] + [j + self.n for j in mine[i:i + micro_batch]])
            out.append({"inputs": self.x[rows_], "targets": self.y[rows_], "ref": self.ref_s[rows_]})
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos, "seed": self.seed, "n": self.n}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["seed"], state["n"]) != (self.seed, self.n):
            raise ValueError(f"pair loader state is for seed {state['seed']} / {state['n']} pairs, not {self.seed} / {self.n}")
        self.pos = int(state["pos"])
