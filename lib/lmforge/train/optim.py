"""Optimizers and the learning-rate schedule.

`build(model, cfg)` returns a list of optimizers over disjoint parameter sets:
- Muon (torch.optim.Muon) for every 2-D weight matrix inside the blocks (attention and MLP
  projections), with decoupled weight decay `cfg.weight_decay`;
- AdamW for the input embedding, the output head and the norm weights, each its own group
  with its own lr, scaled by (d_model / lr_scale_dim) ** -0.5 as in nanochat.
With `matrix: adamw` the matrices go to AdamW too (one optimizer). `Muon` is torch's, extended
to sharded (FSDP2) matrices.

Each param group keeps its peak lr in `group["peak_lr"]`; `set_lr(opts, mult)` applies the
schedule multiplier. `wsd(step, total, cfg)` is the warmup-stable-decay multiplier. A
group may also carry `lr_mult` (default 1), a hook for training plug-ins that scale groups.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn
from torch.distributed.tensor import DTensor
from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

from .config import OptimConfig, ScheduleConfig
from .shard import full, like


class Muon(torch.optim.Muon):
    """torch.optim.Muon that also updates matrices sharded by FSDP2 (DTensors), exactly.

    Orthogonalising a shard alone would be wrong, and letting DTensor run the Newton-Schulz
    matmuls over shards sums in another order than one process does. So for a sharded matrix
    the momentum stays sharded (elementwise), the update is gathered whole, orthogonalised by
    torch's own function on every process, and each process applies its rows: the same
    numbers as one process. Unsharded parameters go through torch's step unchanged."""

    @torch.no_grad()
    def step(self, closure=None):  # type: ignore[no-untyped-def, override]
        if not any(isinstance(p, DTensor) for g in self.param_groups for p in g["params"]):
            return super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - group["momentum"])
                update = p.grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                ortho = _zeropower_via_newtonschulz(full(update), group["ns_coefficients"], group["ns_steps"],
                                                    group["eps"])
                p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(like(p, ortho), alpha=-_adjust_lr(group["lr"], group["adjust_lr_fn"], p.shape))
        return None


def param_groups(model: nn.Module) -> dict[str, list[tuple[str, nn.Parameter]]]:
    """Split trainable parameters by role: matrix (block 2-D weights), embedding, head, scalar."""
    groups: dict[str, list[tuple[str, nn.Parameter]]] = {"matrix": [], "embedding": [], "head": [], "scalar": []}
    seen: set[int] = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))  # a tied head is the embedding: trained once, as the embedding
        if "embed_tokens" in name:
            groups["embedding"].append((name, p))
        elif name.startswith("lm_head"):
            groups["head"].append((name, p))
        elif p.ndim == 2:
            groups["matrix"].append((name, p))
        else:
            groups["scalar"].append((name, p))
    return groups


def build(model: nn.Module, cfg: OptimConfig, d_model: int, *, fused: bool = False,
          split: Mapping[str, str] | None = None) -> list[torch.optim.Optimizer]:
    """The optimizers. With `split` (parameter name -> a plug-in's group name, e.g. the
    governor's) each role's param group is split further, one param group per split value,
    marked `gov`, so a plug-in can scale each one's lr."""
    groups = param_groups(model)
    scale = (d_model / cfg.lr_scale_dim) ** -0.5

    def parts(role: str, **opts: object) -> list[dict[str, object]]:
        if split is None:
            return [{"params": [p for _, p in groups[role]], "role": role, **opts}] if groups[role] else []
        by: dict[str, list[nn.Parameter]] = {}
        for name, p in groups[role]:
            by.setdefault(split[name], []).append(p)
        return [{"params": ps, "role": role, "gov": gov, **opts} for gov, ps in by.items()]

    adam_groups = [g for role, lr in (("embedding", cfg.embedding_lr), ("head", cfg.head_lr), ("scalar", cfg.scalar_lr))
                   for g in parts(role, lr=lr * scale, weight_decay=0.0)]
    opts: list[torch.optim.Optimizer] = []
    if cfg.matrix == "adamw":
        adam_groups += parts("matrix", lr=cfg.matrix_lr, weight_decay=cfg.weight_decay)
    extra = {"fused": True} if fused else {"foreach": False}  # foreach=False: same kernels every run
    if adam_groups:
        opts.append(torch.optim.AdamW(adam_groups, betas=cfg.betas, eps=cfg.eps, **extra))
    if cfg.matrix == "muon" and groups["matrix"]:
        opts.append(Muon(parts("matrix"), lr=cfg.matrix_lr, weight_decay=cfg.weight_decay,
                         momentum=cfg.muon_momentum, adjust_lr_fn="original"))
    for opt in opts:
        for g in opt.param_groups:
            g["peak_lr"] = g["lr"]
            g.setdefault("lr_mult", 1.0)
    return opts


def wsd(step: int, total: int, cfg: ScheduleConfig) -> float:
    """Warmup-stable-decay lr multiplier for optimizer step `step` (0-based) of `total`."""
    warmup = round(cfg.warmup_frac * total)
    decay = round(cfg.decay_frac * total)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if decay and step >= total - decay:
        progress = (step - (total - decay) + 1) / decay
        return 1.0 - progress * (1.0 - cfg.final_lr_frac)
    return 1.0


def set_lr(opts: list[torch.optim.Optimizer], mult: float) -> None:
    for opt in opts:
        for g in opt.param_groups:
            g["lr"] = g["peak_lr"] * g.get("lr_mult", 1.0) * mult
