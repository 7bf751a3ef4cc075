"""The delta lifecycle on one base model: forge, validate, register, route, consolidate, remove.
The forge stage and `lmforge forge add|ask` both go through a `Forger`.

    f = Forger(model, enc, unrelated_split, LifecycleConfig(...), dist=dist)
    row = f.add(registry, facts, category="invented", seed=1, provenance={...}, created="...")
    f.routed(registry.entries())(x)                   # the base plus routed, composed deltas
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import tiktoken
import torch
from pydantic import Field, field_validator
from safetensors.torch import load_file, save_file
from torch import nn

from ..config import Config
from ..train import loop
from ..train.config import TrainConfig
from ..train.dist import Dist
from . import consolidate
from .delta import Delta, weights_sha256
from .evaluate import score, top1
from .facts import Fact, Split
from .forging import DeltaConfig, forge
from .registry import Entry, Policy, Registry, RegistryRefused
from .routed import Routed
from .router import Key, Router, subject_keys


class GateConfig(Config):
    """A delta is registered only if, alone and routed, it reaches all three on its own facts."""

    efficacy: float = 0.9
    paraphrase: float = 0.7
    locality: float = 0.95

    @field_validator("efficacy", "paraphrase", "locality")
    @classmethod
    def _share(cls, v: float) -> float:
        if not 0.0 <= v <= 1.0:
            raise ValueError(f"a gate threshold is a share of prompts, within [0, 1] (got {v})")
        return v


class RouterConfig(Config):
    top_k: int = Field(2, ge=1)
    min_similarity: float = Field(0.98, ge=-1, le=1)  # cosine


class LifecycleConfig(Config):
    delta: DeltaConfig = DeltaConfig()
    train: TrainConfig                # one delta's loop
    gate: GateConfig = GateConfig()
    router: RouterConfig = RouterConfig()
    registry: Policy = Policy()


def rounded(x: float) -> float:
    return round(float(x), 6)


def breaches(m: Mapping[str, float], gate: GateConfig) -> list[str]:
    return [f"{k} {m[k]:.3f} < {getattr(gate, k)}" for k in ("efficacy", "paraphrase", "locality")
            if not m[k] >= getattr(gate, k)]


def cached(path: Path | None, make: Callable[[], Delta]) -> Delta:
    """`make()`, or the delta a previous (killed) run finished and left at `path`."""
    if path is None:
        return make()
    meta = path.with_suffix(".json")
    if path.exists() and meta.exists():
        m = json.loads(meta.read_text())
        return Delta.from_tensors(load_file(str(path)), m["rank"], m["alpha"])
    d = make()
    save_file(d.tensors(), str(path))
    meta.write_text(json.dumps({"rank": d.rank, "alpha": d.alpha}))
    return d


class Forger:
    def __init__(self, model: nn.Module, enc: tiktoken.Encoding, unrelated: Split, cfg: LifecycleConfig, *,
                 dist: Dist):
        self.model, self.enc, self.unrelated, self.cfg, self.dist = model.requires_grad_(False), enc, unrelated, cfg, dist
        self.base_sha256 = weights_sha256(model)
        self.base_top = top1(lambda x, _n: model(x), enc, unrelated.heldout, device=dist.device)

    def registry(self, root: str | Path) -> Registry:
        shapes = {n: tuple(m.weight.shape) for n, m in self.model.named_modules() if isinstance(m, nn.Linear)}
        return Registry(root, base_sha256=self.base_sha256, policy=self.cfg.registry, shapes=shapes)  # type: ignore[arg-type]

    def router(self, keys: Mapping[str, Key]) -> Router:
        return Router.for_model(self.model, keys, top_k=self.cfg.router.top_k,
                                min_similarity=self.cfg.router.min_similarity)

    def routed(self, entries: Sequence[Entry] | Mapping[str, tuple[Delta, Key]]) -> Routed:
        pairs = dict(entries) if isinstance(entries, Mapping) else {e.id: (e.delta, e.key) for e in entries}
        return Routed(self.model, {i: d for i, (d, _) in pairs.items()}, self.router({i: k for i, (_, k) in pairs.items()}))

    def key(self, facts: Sequence[Fact]) -> Key:
        return subject_keys(self.model, self.enc, [f.subject for f in facts])

    def evaluate(self, fn: Callable[[torch.Tensor, Sequence[int]], torch.Tensor], facts: Sequence[Fact]) -> dict[str, float]:
        return {k: rounded(v) for k, v in score(fn, self.enc, facts, self.unrelated.heldout, self.base_top,
                                           device=self.dist.device).items()}

    def train(self, facts: Sequence[Fact], *, seed: int, steps: int | None = None, init: Delta | None = None,
              cache: Path | None = None, ckpt_dir: Path | None = None, log: loop.Log | None = None) -> Delta:
        train = self.cfg.train if steps is None else self.cfg.train.model_copy(update={"steps": steps})
        return cached(cache, lambda: forge(self.model, self.enc, facts, self.unrelated.anchor, self.cfg.delta, train,
                                           dist=self.dist, seed=seed, init=init, ckpt_dir=ckpt_dir, log=log)[0])

    def validate(self, delta: Delta, key: Key, facts: Sequence[Fact]) -> dict[str, Any]:
        m = self.evaluate(self.routed({"new": (delta, key)}), facts)
        why = breaches(m, self.cfg.gate)
        return {**m, "accepted": not why, "breaches": why}

    def register(self, reg: Registry, delta: Delta, key: Key, facts: Sequence[dict[str, Any]], row: dict[str, Any], *,
                 category: str, created: str, provenance: dict[str, Any], replacing: tuple[str, ...] = ()) -> dict[str, Any]:
        """Add a validated delta; a refusal (overlap, capacity, base) is recorded in the row."""
        if not row["accepted"]:
            return row
        metrics = {k: row[k] for k in ("efficacy", "paraphrase", "locality")}
        try:
            entry = reg.add(delta, key, {"category": category, "facts": list(facts), "base_sha256": self.base_sha256,
                                         "metrics": metrics, "created": created, "provenance": provenance},
                            replacing=replacing)
        except RegistryRefused as e:
            return row | {"accepted": False, "breaches": [str(e)]}
        return row | {"id": entry.id, "overlap": entry.manifest["checks"]["overlap"],
                      "overlap_with": entry.manifest["checks"]["overlap_with"]}

    def add(self, reg: Registry, facts: Sequence[Fact], *, category: str, seed: int, created: str,
            provenance: dict[str, Any], cache: Path | None = None, ckpt_dir: Path | None = None,
            log: loop.Log | None = None) -> dict[str, Any]:
        """Forge `facts` into one delta, validate it alone, register it if it passes. Nothing is
        written to the registry unless every check passed."""
        delta = self.train(facts, seed=seed, cache=cache, ckpt_dir=ckpt_dir, log=log)
        key = self.key(facts)
        row = {"facts": len(facts), **self.validate(delta, key, facts)}
        return self.register(reg, delta, key, [f.to_json() for f in facts], row, category=category, created=created,
                             provenance=provenance | {"seed": seed})

    def consolidate(self, reg: Registry, entries: Sequence[Entry], facts: Sequence[Fact], *, rank: int,
                    repair_steps: int, seed: int, created: str, provenance: dict[str, Any],
                    cache: Path | None = None, ckpt_dir: Path | None = None, log: loop.Log | None = None) -> dict[str, Any]:
        """Merge `entries` (one category) by truncated SVD, repair it on their facts, validate;
        only if it passes does it replace them (added first, then they are removed)."""
        cut, rep = consolidate.merge([e.delta for e in entries], rank)
        merged = (self.train(facts, seed=seed, steps=repair_steps, init=cut, cache=cache, ckpt_dir=ckpt_dir, log=log)
                  if repair_steps else cut)
        key = Key(torch.cat([e.key.vectors for e in entries]), torch.cat([e.key.lengths for e in entries]))
        row = {"from": [e.id for e in entries], "rank": rep["rank"], "from_ranks": rep["from_ranks"],
               "svd_error": rep["error"], "repair_steps": repair_steps, **self.validate(merged, key, facts)}
        category = str(entries[0].manifest["category"])
        row = self.register(reg, merged, key, [f for e in entries for f in e.manifest["facts"]], row,
                            category=category, created=created,
                            provenance=provenance | {"consolidated_from": row["from"]},
                            replacing=tuple(row["from"]))
        if "id" in row:
            for e in entries:
                reg.remove(e.id)
        return row
