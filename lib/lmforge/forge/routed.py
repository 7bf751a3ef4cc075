"""The base model with registered deltas, routed per row: what `lmforge forge ask` and the stage's
evaluation run.

    routed = Routed(model, {entry.id: entry.delta for entry in reg.entries()}, router)
    logits = routed(x)                     # each row routed on its own tokens
    logits = routed(x, prompt_lens)        # ... on its first prompt_lens[i] tokens only

Rows are grouped by their set of active deltas; a group with none runs the bare base (no hook
exists), so its logits are the base's bit for bit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn

from .delta import Delta, applied
from .router import Router


class Routed(nn.Module):
    def __init__(self, base: nn.Module, deltas: Mapping[str, Delta], router: Router):
        super().__init__()
        self.base, self.router = base, router
        self.deltas = dict(deltas)
        self.last_active: list[list[str]] = []

    def forward(self, x: torch.Tensor, prompt_lens: Sequence[int] | None = None) -> torch.Tensor:
        rows = x.cpu().tolist()
        active = [self.router.route(r[:prompt_lens[i]] if prompt_lens is not None else r) for i, r in enumerate(rows)]
        self.last_active = active
        groups: dict[tuple[str, ...], list[int]] = {}
        for i, a in enumerate(active):
            groups.setdefault(tuple(a), []).append(i)
        out: torch.Tensor | None = None
        for ids, idx in sorted(groups.items()):
            with applied(self.base, [self.deltas[i] for i in ids]):
                logits = self.base(x[idx])
            if out is None:
                out = logits.new_empty((x.shape[0], *logits.shape[1:]))
            out[idx] = logits
        assert out is not None
        return out
