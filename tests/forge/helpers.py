"""Shared by the forge tests: a tiny model, a delta with random factors, the real facts file."""

from __future__ import annotations

from pathlib import Path

import torch

from lmforge.forge.delta import Delta, targets
from lmforge.model import GPT, ModelConfig

REAL = Path(__file__).resolve().parents[2] / "data" / "sources" / "facts.jsonl.gz"


def tiny(vocab: int, seed: int = 0, layers: int = 2) -> GPT:
    """Random weights, every matrix N(0, 1/fan_in): unlike the training init (zero output
    projections, a near-zero head) every layer changes the logits, as in a trained model."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab, n_layer=layers, d_model=32, n_head=2, n_kv_head=1, head_dim=16,
                            d_mlp=64, max_seq_len=64))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed_tokens" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return model.eval()


def random_delta(model: torch.nn.Module, seed: int, rank: int = 4) -> Delta:
    """A delta on the middle band's gate and down projections with random A and B (B is zero
    in a fresh delta, which would change nothing)."""
    d = Delta.new(model, targets(model, None, ["gate_proj", "down_proj"]), rank=rank, alpha=8, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for p in d.B.values():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return d.requires_grad_(False)
