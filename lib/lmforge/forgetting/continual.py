"""The continual benchmark: domains trained one after another, every method the same budget.

For each method and seed, a model (the pretrained one, or a fresh one of the tiny family) is
trained on domain 0, then 1, ... with `train.steps` optimizer steps each, a fresh optimizer per
domain. Before any training and after each domain, every domain's held-out rows (the mix's
validation documents of that source) are scored: next-token loss, accuracy and bpb. Methods are
plug-ins of the one training loop (lmforge.train.loop.fit):

    ce           plain cross-entropy (the LM objective)
    ewc          + an EWC penalty, per task or online (lmforge.forgetting.ewc: an objective)
    replay       `fraction` of every batch drawn from earlier domains' memories (a data source)
    persistence  the persistence-weighted loss (lmforge.forgetting.persistence: an objective)
    governed     the govern stage's convergence governor, fresh on every domain (a plug-in)

Everything is seeded by (seed, domain index): a run is a pure function of its inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import model_validator
from torch import nn

from ..config import Config
from ..model import GPT
from ..tokens import TokenSplit
from ..train.config import TrainConfig
from ..train.data import PackedRows, fixed_rows
from ..train.dist import Dist
from ..train.evaluate import bits_per_byte
from ..train.governor import Governor, GovernorConfig
from ..train.groups import GroupSpec, partition
from ..train.loop import LM, Data, Evaluate, Objective, Plugin, fit
from . import persistence as persistence_loss
from .ewc import EWC
from .persistence import PersistenceConfig
from .replay import replay

Kind = Literal["ce", "ewc", "replay", "persistence", "governed"]

# The standard layout's groups (the same as params.yaml: govern.groups).
STANDARD_GROUPS = [
    GroupSpec(name="embed", level=0, patterns=["model.embed_tokens.weight"]),
    GroupSpec(name="norms", level=0, patterns=["model.norm.weight", "model.layers.*.input_layernorm.weight",
                                               "model.layers.*.post_attention_layernorm.weight"]),
    GroupSpec(name="attn", level=1, patterns=["model.layers.*.self_attn.*"], per_layer=True),
    GroupSpec(name="mlp", level=2, patterns=["model.layers.*.mlp.*"], per_layer=True),
    GroupSpec(name="head", level=3, patterns=["lm_head.weight"]),
]

# The keys each kind reads; setting another kind's key is an error, not silently ignored.
KIND_KEYS: dict[str, set[str]] = {
    "ce": set(),
    "ewc": {"lam", "ewc_mode", "gamma", "fisher_rows"},
    "replay": {"fraction", "memory_rows"},
    "persistence": {"persistence"},
    "governed": {"groups", "governor"},
}


class Method(Config):
    name: str
    kind: Kind
    lam: float = 100.0                          # ewc: penalty strength lambda
    ewc_mode: Literal["per_task", "online"] = "per_task"
    gamma: float = 1.0                          # ewc online: decay of the running Fisher
    fisher_rows: int = 32                       # ewc: rows of a domain's training stream for its Fisher
    fraction: float = 0.25                      # replay: share of each batch from earlier domains
    memory_rows: int = 64                       # replay: rows remembered per domain
    persistence: PersistenceConfig = PersistenceConfig()
    groups: list[GroupSpec] = STANDARD_GROUPS   # governed
    governor: GovernorConfig = GovernorConfig()  # governed

    @model_validator(mode="after")
    def _keys(self) -> Method:
        foreign = sorted(k for k in self.model_fields_set - {"name", "kind"} if k not in KIND_KEYS[self.kind])
        if foreign:
            owners = {k: next(kind for kind, keys in KIND_KEYS.items() if k in keys) for k in foreign}
            raise ValueError(f"method '{self.name}' (kind {self.kind}): " + ", ".join(
                f"key '{k}' belongs to kind {owners[k]}" for k in foreign) + "; remove it")
        if self.lam < 0 or not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"method '{self.name}': lam must be >= 0 and gamma in [0, 1]")
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"method '{self.name}': fraction must be in [0, 1) (got {self.fraction})")
        if self.fisher_rows < 1 or self.memory_rows < 1:
            raise ValueError(f"method '{self.name}': fisher_rows and memory_rows must be >= 1")
        return self


@dataclass(frozen=True)
class Domain:
    name: str
    train: TokenSplit
    test_rows: np.ndarray  # held-out: the scores of R
    dev_rows: np.ndarray   # from the train split: the governor's evaluations (never the test rows)


def domains(train: dict[str, TokenSplit], val: dict[str, TokenSplit], seq_len: int, eval_rows: int) -> list[Domain]:
    return [Domain(name, train[name], fixed_rows(val[name], seq_len, eval_rows),
                   fixed_rows(train[name], seq_len, eval_rows or 32)) for name in train]


def stream(domain: Domain, seq_len: int, seed: int, k: int) -> PackedRows:
    """Domain k's training rows in the order a run with `seed` sees them."""
    return PackedRows(domain.train, seq_len, seed=seed * 1000 + k)


def run_sequence(method: Method, seed: int, init: Callable[[int], GPT], doms: list[Domain], tcfg: TrainConfig,
                 tbytes: np.ndarray, dist: Dist) -> dict[str, Any]:
    """One method, one seed: {"b": scores at init, "R": scores after each domain}; a score is
    {"val_loss", "val_acc", "val_bpb"} per domain."""
    torch.manual_seed(seed)
    model = init(seed).to(dist.device)

    def score() -> list[dict[str, float]]:
        return [bits_per_byte(model, d.test_rows, tbytes, dist, micro_batch=tcfg.micro_batch, accuracy=True)
                for d in doms]

    b, R = score(), []
    ewc = EWC(method.lam, method.ewc_mode, method.gamma) if method.kind == "ewc" else None
    memories: list[np.ndarray] = []
    for k, dom in enumerate(doms):
        torch.manual_seed(seed * 1000 + k)
        current = stream(dom, tcfg.seq_len, seed, k)
        data: Data = current
        objective: Objective = LM
        plugin: Plugin | None = None
        evaluate: Evaluate | None = None
        if method.kind == "replay":
            data = replay(current, memories, method.fraction, seed * 1000 + k)
        elif ewc is not None:
            objective = ewc.objective()
        elif method.kind == "persistence":
            objective = persistence_loss.objective(method.persistence)
        elif method.kind == "governed":
            plugin = Governor(method.governor, partition(model, method.groups, where=f"method '{method.name}'.groups"))

            def evaluate(m: nn.Module, rows: np.ndarray = dom.dev_rows) -> dict[str, float]:
                return bits_per_byte(m, rows, tbytes, dist, micro_batch=tcfg.micro_batch)

        fit(model, objective, data, tcfg, dist=dist, total_steps=tcfg.total_steps(model.config.n_params()),
            d_model=model.config.d_model, evaluate=evaluate, plugin=plugin)
        for p in model.parameters():  # a governed run leaves groups frozen
            p.requires_grad_(True)
        if ewc is not None and k + 1 < len(doms):
            ewc.consolidate(model, stream(dom, tcfg.seq_len, seed, k).take(method.fisher_rows), dist.device)
        if method.kind == "replay":
            memories.append(stream(dom, tcfg.seq_len, seed, k).take(method.memory_rows))
        R.append(score())
    return {"b": b, "R": R}


def matrix(run: dict[str, Any], key: str, sign: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(R, b) of one score: `sign` -1 turns a loss into a higher-is-better score."""
    R = np.array([[sign * s[key] for s in row] for row in run["R"]])
    return R, np.array([sign * s[key] for s in run["b"]])
