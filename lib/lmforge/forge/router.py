"""Per-query routing: which registered deltas a prompt activates.

    keys = subject_keys(model, enc, ["Drovask", "Melquint"])     # a delta's key: (K, d) rows
    router = Router({"d-1": keys, ...}, top_k=2, min_similarity=0.98)
    router.route(prompt_ids)                                       # -> ["d-1"] or []

A delta's key holds one row per form of each subject it was forged with: the mean of the
base's input embeddings over the subject's tokens, L2-normalised, for the subject at the start
of a text and after a space (BPE tokenises the two differently). A query scores each delta by
the best cosine between any key row and the mean embedding of any window of the query's tokens
of that row's length. Deltas scoring at least `min_similarity` are active, the `top_k` best of
them (ties by delta id). No active delta: the base runs alone, exactly. Embeddings are the
frozen base's, so keys stay valid as long as the base (its hash) is the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import tiktoken
import torch
from torch import nn

from ..tokenizer import BOS_ID


@dataclass(frozen=True)
class Key:
    vectors: torch.Tensor  # (K, d), unit rows
    lengths: torch.Tensor  # (K,) token count of each row's window


def _embed(model: nn.Module) -> torch.Tensor:
    return model.model.embed_tokens.weight.detach().float().cpu()  # type: ignore[union-attr]


def subject_keys(model: nn.Module, enc: tiktoken.Encoding, subjects: Sequence[str]) -> Key:
    emb = _embed(model)
    rows, lens = [], []
    for s in sorted(set(subjects)):
        for form in (s, " " + s):
            ids = enc.encode_ordinary(form)
            if not ids:
                raise ValueError(f"subject {s!r} encodes to no tokens")
            rows.append(emb[ids].mean(0))
            lens.append(len(ids))
    v = torch.stack(rows)
    return Key(v / v.norm(dim=1, keepdim=True).clamp_min(1e-12), torch.tensor(lens))


def scores(emb: torch.Tensor, ids: Sequence[int], keys: Mapping[str, Key]) -> dict[str, float]:
    """Each delta's best cosine over key rows and same-length windows of `ids` (BOS ignored)."""
    ids = [i for i in ids if i != BOS_ID]
    out = {}
    if not ids:
        return {name: -1.0 for name in keys}
    x = emb[torch.tensor(ids)]
    csum = torch.cat([torch.zeros(1, x.shape[1]), x.cumsum(0)])
    windows: dict[int, torch.Tensor] = {}
    for name, key in keys.items():
        best = -1.0
        for n in key.lengths.unique().tolist():
            if n > len(ids):
                continue
            if n not in windows:
                w = (csum[n:] - csum[:-n]) / n
                windows[n] = w / w.norm(dim=1, keepdim=True).clamp_min(1e-12)
            rows = key.vectors[key.lengths == n]
            best = max(best, float((windows[n] @ rows.t()).max()))
        out[name] = best
    return out


class Router:
    def __init__(self, emb: torch.Tensor, keys: Mapping[str, Key], *, top_k: int, min_similarity: float):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1 (got {top_k})")
        self.emb, self.keys, self.top_k, self.min_similarity = emb, dict(keys), top_k, min_similarity

    @classmethod
    def for_model(cls, model: nn.Module, keys: Mapping[str, Key], *, top_k: int, min_similarity: float) -> Router:
        return cls(_embed(model), keys, top_k=top_k, min_similarity=min_similarity)

    def scores(self, ids: Sequence[int]) -> dict[str, float]:
        return scores(self.emb, ids, self.keys)

    def route(self, ids: Sequence[int]) -> list[str]:
        s = self.scores(ids)
        hits = sorted((name for name, v in s.items() if v >= self.min_similarity), key=lambda n: (-s[n], n))
        return hits[:self.top_k]
