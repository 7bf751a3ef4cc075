"""How well facts took, and what else changed: efficacy, paraphrase, locality.

A *method* is anything that maps token rows to logits, given where each row's prompt ends
(`Logits(x, prompt_lens)`): the base, the base with routed deltas, an always-on LoRA, a fully
fine-tuned copy. All scores are strict:

- efficacy: share of (fact, training template) prompts whose greedy continuation starts with
  every token of the object (not "the object's rank improved");
- paraphrase: the same over the held-out paraphrase templates;
- locality: share of held-out unrelated prompts whose top-1 next token is the base's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import tiktoken
import torch

from ..tokenizer import BOS_ID
from .facts import Fact

Logits = Callable[[torch.Tensor, Sequence[int]], torch.Tensor]


def encode(enc: tiktoken.Encoding, prompt: str, target: str = "") -> tuple[list[int], int]:
    """BOS + prompt tokens + target tokens, and the prompt's length (with BOS). The prompt and
    the target are encoded apart: that is how a prompt arrives and the target is generated."""
    p = [BOS_ID] + enc.encode_ordinary(prompt)
    return p + (enc.encode_ordinary(target) if target else []), len(p)


def pad(seqs: Sequence[Sequence[int]]) -> np.ndarray:
    """Right-padded with 0 (causal attention: padding after a row never changes its logits)."""
    width = max(len(s) for s in seqs)
    out = np.zeros((len(seqs), width), dtype=np.int64)
    for i, s in enumerate(seqs):
        out[i, :len(s)] = s
    return out


@torch.no_grad()
def hits(fn: Logits, enc: tiktoken.Encoding, pairs: Sequence[tuple[str, str]], *, batch: int = 64,
         device: torch.device | str = "cpu") -> list[bool]:
    """For each (prompt, target): is every target token the argmax, given the ones before it
    (the same as: greedy decoding from the prompt produces the target)."""
    out: list[bool] = []
    for i in range(0, len(pairs), batch):
        chunk = [encode(enc, p, t) for p, t in pairs[i:i + batch]]
        x = torch.from_numpy(pad([s for s, _ in chunk])).to(device)
        pred = fn(x, [n for _, n in chunk]).argmax(-1).cpu()
        for row, (seq, n) in enumerate(chunk):
            want = torch.tensor(seq[n:])
            out.append(bool(torch.equal(pred[row, n - 1:len(seq) - 1], want)))
    return out


@torch.no_grad()
def top1(fn: Logits, enc: tiktoken.Encoding, prompts: Sequence[str], *, batch: int = 64,
         device: torch.device | str = "cpu") -> list[int]:
    """The next token each prompt's greedy continuation starts with."""
    out: list[int] = []
    for i in range(0, len(prompts), batch):
        chunk = [encode(enc, p) for p in prompts[i:i + batch]]
        x = torch.from_numpy(pad([s for s, _ in chunk])).to(device)
        logits = fn(x, [n for _, n in chunk])
        out += [int(logits[row, n - 1].argmax()) for row, (_, n) in enumerate(chunk)]
    return out


def fact_pairs(facts: Sequence[Fact], which: str) -> list[tuple[str, str]]:
    get = Fact.prompts if which == "templates" else Fact.paraphrase_prompts
    return [(p, f.target) for f in facts for p in get(f)]


def score(fn: Logits, enc: tiktoken.Encoding, facts: Sequence[Fact], unrelated: Sequence[str],
          base_top1: Sequence[int], *, device: torch.device | str = "cpu") -> dict[str, float]:
    eff = hits(fn, enc, fact_pairs(facts, "templates"), device=device)
    para = hits(fn, enc, fact_pairs(facts, "paraphrases"), device=device)
    loc = [a == b for a, b in zip(top1(fn, enc, unrelated, device=device), base_top1, strict=True)]
    return {"efficacy": float(np.mean(eff)), "paraphrase": float(np.mean(para)) if para else float("nan"),
            "locality": float(np.mean(loc)) if loc else float("nan")}
