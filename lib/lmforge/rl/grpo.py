"""GRPO with verifiable rewards, as an objective and a data source of the one training loop.

Each optimizer step's data is made by the policy itself (`Rollouts.next_step`): the next
`prompts_per_step` problems, `group_size` sampled replies each from the engine, a reward per
reply from the verifier, and group-relative advantages A = (r - mean(group)) [/ std(group)].
The rollout also records each reply token's log-probability under the policy that sampled it
(`old`) and under the frozen reference (`ref`, the SFT model).

The loss (`GRPO`) is token-level: over every reply token of the step,
    -min(ratio A, clip(ratio, 1 - eps, 1 + eps) A) + kl_coef * KL,  ratio = exp(logp - old),
with KL the k3 estimator exp(ref - logp) - (ref - logp) - 1 (zero with zero gradient when the
policy is the reference). With `ppo_epochs` > 1 a rollout is reused for that many optimizer
steps (the clipped ratio keeps them near the sampling policy); with 1 the ratio is 1 and this
is plain policy gradient with a baseline. A group whose rewards are all equal has advantages
of zero and contributes only its KL term; a step whose rewards are all zero leaves the weights
unchanged (tested).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import tiktoken
import torch
from torch import nn

from ..chat import prompt_ids
from ..data.chats import Conversation
from ..engine import generate
from ..tokenizer import BOS_ID, special_id
from ..train.loop import Batch, Objective
from .rewards import rewards

END = special_id("assistant_end")


def group_advantages(r: torch.Tensor, *, scale: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """Advantages of rewards `r` (prompts, group): reward minus its group's mean, divided by the
    group's standard deviation when `scale` (zero, not NaN, for a group of equal rewards)."""
    adv = r - r.mean(dim=1, keepdim=True)
    return adv / (r.std(dim=1, keepdim=True, unbiased=False) + eps) if scale else adv


def token_logps(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target) at every position (B, T); 0 where the target is -1."""
    logits = model(inputs).float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return logp * (targets != -1)


def rows(prompts: Sequence[Sequence[int]], replies: Sequence[Sequence[int]],
         width: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt + reply per row, right-padded with BOS: inputs and targets (only the reply's
    tokens are targets; -1 elsewhere)."""
    seqs = [list(p) + list(r) for p, r in zip(prompts, replies, strict=True)]
    width = width or max(len(s) for s in seqs)
    x = torch.full((len(seqs), width), BOS_ID, dtype=torch.long)
    y = torch.full((len(seqs), width), -1, dtype=torch.long)
    for i, (p, s) in enumerate(zip(prompts, seqs, strict=True)):
        x[i, :len(s)] = torch.tensor(s)
        y[i, len(p) - 1:len(s) - 1] = torch.tensor(s[len(p):])
    return x[:, :-1], y[:, :-1]


def _loss(clip: float, kl_coef: float) -> Callable[[nn.Module, Batch], torch.Tensor]:
    def loss(model: nn.Module, batch: Batch) -> torch.Tensor:
        mask = batch["targets"] != -1
        logp = token_logps(model, batch["inputs"], batch["targets"])
        ratio = torch.exp(logp - batch["old"])
        adv = batch["adv"][:, None]
        pg = -torch.minimum(ratio * adv, ratio.clamp(1.0 - clip, 1.0 + clip) * adv)
        if kl_coef:
            d = batch["ref"] - logp
            pg = pg + kl_coef * (torch.exp(d) - d - 1.0)
        return (pg * mask).sum()
    return loss


def objective(*, clip: float, kl_coef: float) -> Objective:
    return Objective("grpo", _loss(clip, kl_coef), lambda b: int((b["targets"] != -1).sum()))


class Rollouts:
    """The loop's data source for GRPO: each step, replies sampled from `model` now."""

    follows_model = True  # batches depend on the weights being trained (fit refuses to shard them)

    def __init__(self, model: nn.Module, ref: nn.Module, enc: tiktoken.Encoding, problems: Sequence[Conversation], *,
                 prompts_per_step: int, group_size: int, temperature: float, top_k: int | None,
                 max_new_tokens: int, format_weight: float, scale: bool, ppo_epochs: int, seed: int,
                 rank: int = 0, world: int = 1, log: Callable[[Mapping[str, Any], int], None] | None = None):
        if prompts_per_step % world:
            raise ValueError(f"prompts_per_step {prompts_per_step} must be a multiple of the {world} processes")
        self.model, self.ref, self.enc, self.problems = model, ref, enc, list(problems)
        self.p, self.g, self.temperature, self.top_k = prompts_per_step, group_size, temperature, top_k
        self.max_new, self.format_weight, self.scale, self.ppo_epochs = max_new_tokens, format_weight, scale, ppo_epochs
        self.seed, self.rank, self.world, self.log = seed, rank, world, log
        self.draw, self.used = 0, 0  # rollouts made; optimizer steps taken on the current one
        self._batch: list[Batch] | None = None

    def _problems(self, draw: int) -> list[Conversation]:
        """Draw `draw`'s prompts: epochs over the problems, each in a seeded order."""
        n = len(self.problems)
        out = []
        for k in range(draw * self.p, (draw + 1) * self.p):
            order = np.random.default_rng([self.seed, k // n]).permutation(n)
            out.append(self.problems[int(order[k % n])])
        return out

    @torch.no_grad()
    def _rollout(self, micro_batch: int) -> list[Batch]:
        per = self.p // self.world
        mine = self._problems(self.draw)[self.rank * per:(self.rank + 1) * per]
        prompts = [prompt_ids(self.enc, c.turns[:-1]) for c in mine]
        flat = [p for p in prompts for _ in range(self.g)]
        was = self.model.training
        replies = generate(self.model, flat, self.max_new, temperature=self.temperature, top_k=self.top_k,
                           stop_tokens=(END,), seed=(self.seed * 1_000_003 + self.draw * 1009 + self.rank) % 2**31,
                           vocab_size=self.enc.n_vocab)
        self.model.train(was)
        texts = [self.enc.decode(r) for r in replies]
        r = torch.tensor(rewards(texts, [c.answer for c in mine for _ in range(self.g)],  # type: ignore[misc]
                                 format_weight=self.format_weight)).view(per, self.g)
        adv = group_advantages(r, scale=self.scale).flatten()
        # a reply that stopped ends with <|assistant_end|>, which is trained too (learning to stop)
        full = [rep + [END] if len(rep) < self.max_new else rep for rep in replies]
        x, y = rows(flat, full)
        batches: list[Batch] = []
        kls = []
        for i in range(0, len(flat), micro_batch):
            xs, ys = x[i:i + micro_batch], y[i:i + micro_batch]
            dev = next(self.model.parameters()).device
            old = token_logps(self.model, xs.to(dev), ys.to(dev)).cpu()
            ref = token_logps(self.ref, xs.to(dev), ys.to(dev)).cpu()
            m = ys != -1
            d = (ref - old)[m]
            kls.append(float((torch.exp(d) - d - 1.0).sum()))
            batches.append({"inputs": xs, "targets": ys, "adv": adv[i:i + micro_batch], "old": old, "ref": ref})
        if self.log is not None:
            n_tok = int((y != -1).sum())
            correct = [float(v >= 1.0) for v in r.flatten().tolist()]
            self.log({"rl/reward_mean": float(r.mean()), "rl/accuracy": float(np.mean(correct)),
                      "rl/kl": sum(kls) / max(n_tok, 1), "rl/reply_tokens": n_tok / len(flat),
                      "rl/groups_with_signal": float((r.std(dim=1) > 0).float().mean())}, self.draw + 1)
        return batches

    def next_step(self, global_batch: int, micro_batch: int) -> list[Batch]:
        if global_batch != self.p * self.g:
            raise ValueError(f"global_batch {global_batch} must be prompts_per_step x group_size = {self.p * self.g}")
        if self._batch is None or self.used == self.ppo_epochs:
            self._batch, self.used = self._rollout(micro_batch), 0
            self.draw += 1
        self.used += 1
        return self._batch

    def state_dict(self) -> dict[str, Any]:
        # checkpoints fall between rollouts (the config makes ckpt_every a multiple of ppo_epochs)
        return {"draw": self.draw, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"rollout state is for seed {state['seed']}, not {self.seed}")
        self.draw, self.used, self._batch = int(state["draw"]), 0, None
