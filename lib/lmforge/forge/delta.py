"""Low-rank weight deltas on a frozen base, applied beside it, never merged into it.

    d = Delta.new(model, targets(model, layers=None, projections=("gate_proj", "up_proj", "down_proj")),
                  rank=16, alpha=32, seed=0)
    with applied(model, [d]):        # forward hooks: y = W x + (alpha / rank) * B (A x)
        logits = model(idx)
    logits_base = model(idx)         # hooks gone: exactly the base's computation, bit for bit

A delta is, per target projection (an `nn.Linear` named as in Hugging Face's Llama layout,
e.g. `model.layers.1.mlp.down_proj`), a pair A (rank x in) and B (out x rank), PEFT's LoRA
convention (A random, B zero at the start, scale alpha / rank). The base weights are never
written: `weights_sha256(model)` is the same before, during and after any use of deltas.
With no delta applied no hook exists, so the output is the base's exactly (not "within a
tolerance"). Several deltas applied together add their contributions (composition).
"""

from __future__ import annotations

import contextlib
import hashlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

PROJECTIONS = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
               "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def middle_band(n_layer: int) -> list[int]:
    """The default target layers: the middle half of the blocks, [n/4, 3n/4) rounded outwards
    (every block for a model of three or fewer)."""
    lo, hi = n_layer // 4, -(-3 * n_layer // 4)
    return list(range(lo, max(hi, lo + 1)))


def targets(model: nn.Module, layers: Sequence[int] | None, projections: Sequence[str]) -> list[str]:
    """Module names of the projections a delta trains, checked against the model."""
    n_layer = len(model.model.layers)  # type: ignore[union-attr]
    layers = middle_band(n_layer) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < n_layer]
    if bad:
        raise ValueError(f"layers {bad} do not exist (the model has layers 0..{n_layer - 1})")
    unknown = [p for p in projections if p not in PROJECTIONS]
    if unknown:
        raise ValueError(f"unknown projections {unknown} (allowed: {sorted(PROJECTIONS)})")
    return [f"model.layers.{i}.{PROJECTIONS[p]}.{p}" for i in sorted(set(layers)) for p in projections]


def weights_sha256(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer that is saved (name, dtype, shape, bytes), in name
    order: the identity of a base model, independent of file layout."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _key(name: str) -> str:
    return name.replace(".", "__")  # parameter names cannot hold dots


class Delta(nn.Module):
    """One low-rank delta: factors A (rank x in) and B (out x rank) per target module."""

    def __init__(self, shapes: dict[str, tuple[int, int]], rank: int, alpha: float):
        super().__init__()
        if rank < 1:
            raise ValueError(f"rank must be >= 1 (got {rank})")
        self.rank, self.alpha = rank, float(alpha)
        self.names = sorted(shapes)
        self.A = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros(rank, shapes[n][1])) for n in self.names})
        self.B = nn.ParameterDict({_key(n): nn.Parameter(torch.zeros(shapes[n][0], rank)) for n in self.names})

    @classmethod
    def new(cls, model: nn.Module, names: Sequence[str], *, rank: int, alpha: float, seed: int) -> Delta:
        """A fresh delta: A ~ U(+-1/sqrt(in)) from `seed` (PEFT's Kaiming-uniform bound), B = 0."""
        mods = dict(model.named_modules())
        shapes = {n: tuple(mods[n].weight.shape) for n in names}
        d = cls(shapes, rank, alpha)  # type: ignore[arg-type]
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for n in d.names:
                a = d.A[_key(n)]
                bound = 1.0 / math.sqrt(a.shape[1])
                a.copy_(torch.rand(a.shape, generator=g) * 2 * bound - bound)
        return d

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.A[_key(name)], self.B[_key(name)]

    def weight_delta(self, name: str) -> torch.Tensor:
        """The full (out x in) matrix this delta adds to module `name`'s weight."""
        a, b = self.factors(name)
        return self.scale * (b @ a)

    def tensors(self) -> dict[str, torch.Tensor]:
        """For safetensors: `<module>.lora_A` / `<module>.lora_B`."""
        out = {}
        for n in self.names:
            a, b = self.factors(n)
            out[f"{n}.lora_A"], out[f"{n}.lora_B"] = a.detach().contiguous(), b.detach().contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], rank: int, alpha: float) -> Delta:
        names = sorted({k.rsplit(".", 1)[0] for k in tensors})
        shapes = {}
        for n in names:
            a, b = tensors.get(f"{n}.lora_A"), tensors.get(f"{n}.lora_B")
            if a is None or b is None or a.ndim != 2 or b.ndim != 2 or a.shape[0] != rank or b.shape[1] != rank:
                raise ValueError(f"module {n}: expected lora_A (rank {rank} x in) and lora_B (out x rank {rank})")
            shapes[n] = (b.shape[0], a.shape[1])
        d = cls(shapes, rank, alpha)
        with torch.no_grad():
            for n in names:
                d.A[_key(n)].copy_(tensors[f"{n}.lora_A"])
                d.B[_key(n)].copy_(tensors[f"{n}.lora_B"])
        return d.requires_grad_(False)


@contextlib.contextmanager
def applied(model: nn.Module, deltas: Sequence[Delta]) -> Iterator[None]:
    """Inside, `model`'s target projections add every delta's contribution; outside, no trace."""
    if not deltas:
        yield
        return
    mods = dict(model.named_modules())
    by_module: dict[str, list[Delta]] = {}
    for d in deltas:
        for n in d.names:
            if n not in mods:
                raise ValueError(f"delta targets {n}, which this model does not have")
            by_module.setdefault(n, []).append(d)

    def hook_for(name: str, ds: list[Delta]):  # noqa: ANN202
        def hook(_mod: nn.Module, args: tuple[torch.Tensor, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            for d in ds:
                a, b = d.factors(name)
                out = out + d.scale * ((x @ a.t().to(x.dtype)) @ b.t().to(x.dtype))
            return out
        return hook

    handles = [mods[n].register_forward_hook(hook_for(n, ds)) for n, ds in sorted(by_module.items())]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


class Adapted(nn.Module):
    """`base` with `deltas` applied on every forward: what the training loop trains (only the
    deltas' factors can require gradients; the base is frozen), and what scores deltas forced on."""

    def __init__(self, base: nn.Module, *deltas: Delta):
        super().__init__()
        self.base, self.deltas = base, nn.ModuleList(deltas)
        base.requires_grad_(False)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        with applied(self.base, list(self.deltas)):  # type: ignore[arg-type]
            return self.base(idx, targets)
