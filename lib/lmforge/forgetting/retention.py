"""Pipeline retention: what each stage's model kept of the pretraining mix, and the release gate.

The table scores every model the DAG has produced so far (pretrain, govern, sft, rl) on the mix's
validation documents of each source: bits per byte per source, and over all sources (the
byte-weighted mean, i.e. total bits over total bytes). The gate compares one model (the final
one) with a reference (the pretrained one) and refuses a model whose val bpb rose by more than
`max_increase` (and, if set, any source's by more than `max_source_increase`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import model_validator

from ..config import Config
from ..tokens import TokenSplit
from ..train.data import fixed_rows
from ..train.dist import Dist
from ..train.evaluate import bits_per_byte
from ..weights import load_model


class RetentionConfig(Config):
    models: list[str] = ["pretrain", "govern", "sft", "rl"]  # stages whose data/<stage>/model is scored
    seq_len: int = 256
    eval_rows: int = 0       # validation rows per source; 0: every row
    micro_batch: int = 16


class GateConfig(Config):
    model: str = "rl"                # the model gated: the one about to be released
    reference: str = "pretrain"      # compared with this one
    max_increase: float = 0.10       # largest allowed relative rise of val bpb over all sources
    max_source_increase: float | None = None  # and of any one source's (null: not checked)
    on_fail: Literal["fail", "warn"] = "fail"

    @model_validator(mode="after")
    def _limits(self) -> GateConfig:
        if self.max_increase < 0 or (self.max_source_increase is not None and self.max_source_increase < 0):
            raise ValueError("max_increase and max_source_increase must be >= 0 (relative rises, 0.1 = +10%)")
        return self


def source_rows(val: dict[str, TokenSplit], seq_len: int, eval_rows: int) -> dict[str, np.ndarray]:
    return {s: fixed_rows(split, seq_len, eval_rows) for s, split in val.items()}


def score(model: torch.nn.Module, rows: dict[str, np.ndarray], tbytes: np.ndarray, dist: Dist, *,
          micro_batch: int) -> dict[str, Any]:
    """{"val_bpb", "by_source": {source: bpb}} of one model: bpb per source, and over all sources
    (total bits over total bytes)."""
    weights = {s: float(tbytes[r[:, 1:]].sum()) for s, r in rows.items()}
    by_source = {s: bits_per_byte(model, r, tbytes, dist, micro_batch=micro_batch)["val_bpb"] for s, r in rows.items()}
    total = sum(by_source[s] * weights[s] for s in rows) / sum(weights.values())
    return {"val_bpb": total, "by_source": by_source}


def table(models: dict[str, Path], val: dict[str, TokenSplit], tbytes: np.ndarray, cfg: RetentionConfig,
          dist: Dist) -> dict[str, dict[str, Any]]:
    """{model: {"val_bpb", "by_source": {source: bpb}}}; every model on the same rows."""
    rows = source_rows(val, cfg.seq_len, cfg.eval_rows)
    return {name: score(load_model(model_dir, device=dist.device)[0], rows, tbytes, dist, micro_batch=cfg.micro_batch)
            for name, model_dir in models.items()}


def decide(tab: dict[str, dict[str, Any]], cfg: GateConfig) -> dict[str, Any]:
    """The gate's decision as an audit record (kind forgetting.gate)."""
    got, ref = tab[cfg.model], tab[cfg.reference]
    increase = got["val_bpb"] / ref["val_bpb"] - 1.0
    by_source = {s: got["by_source"][s] / ref["by_source"][s] - 1.0 for s in ref["by_source"]}
    breaches = []
    if increase > cfg.max_increase:
        breaches.append(f"val bpb {got['val_bpb']:.4f} is {increase:+.2%} over {cfg.reference}'s "
                        f"{ref['val_bpb']:.4f} (limit {cfg.max_increase:+.2%})")
    if cfg.max_source_increase is not None:
        breaches += [f"source {s}: {by_source[s]:+.2%} (limit {cfg.max_source_increase:+.2%})"
                     for s in sorted(by_source) if by_source[s] > cfg.max_source_increase]
    passed = not breaches
    return {
        "kind": "forgetting.gate",
        "model": cfg.model, "reference": cfg.reference,
        "val_bpb": round(got["val_bpb"], 6), "reference_val_bpb": round(ref["val_bpb"], 6),
        "increase": round(increase, 6), "max_increase": cfg.max_increase,
        "source_increases": {s: round(v, 6) for s, v in sorted(by_source.items())},
        "max_source_increase": cfg.max_source_increase,
        "breaches": breaches, "passed": passed, "on_fail": cfg.on_fail,
        "action": "pass" if passed else ("warn" if cfg.on_fail == "warn" else "fail"),
    }


def refusal_message(decision: dict[str, Any]) -> str:
    return (f"forgetting gate: the {decision['model']} model forgot too much to be released: "
            + "; ".join(decision["breaches"])
            + " (fix: train the later stages to forget less (see this stage's benchmark), raise params.yaml: "
            "forgetting.gate.max_increase / max_source_increase, or set forgetting.gate.on_fail: warn)")
