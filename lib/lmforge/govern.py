"""The `govern` stage: continued training of the pretrained model on a mid-training mix, under
per-parameter-group convergence governance (lmforge.train.governor), measured against an
ungoverned continuation with the same data, seed and token budget.

    run(cfg, {"pretrain/model": dir, "tokenizer/tokenizer": dir, "tokenizer/tokens": dir,
              "mix/train": dir, "mix/val": dir}, out_dir, ctx=ctx)

The mid-training mix is the pretraining token stream plus chat-formatted task data: every
document of the `midtrain.chat_sources` sources ("Question: ... Answer: ...") rendered once
more as a user turn and an assistant turn (lmforge.chat). Validation rows come from the
validation split and its chat rendering the same way.

Writes `out_dir/model/` (the governed model), `out_dir/governance.json` (the groups, every
state change with its signals, the evaluation steps, the budget check) and returns the
metrics: `skipped_fraction` (share of parameter-gradient FLOPs not computed, see
governor.grad_work), `val_loss_governed` / `val_loss_ungoverned` (and bpb), their relative
difference, and both runs' wall-clocks in seconds. The wall-clocks are the one part of
metrics.json that differs between re-runs; everything else, the model included, is
byte-identical. Each state change is also a `govern.transition` audit record.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch

from .atomic import write_text
from .chat import qa_turns, render
from .config import Config, StageConfig, non_empty
from .context import RunContext
from .errors import ConfigError, InputError
from .model import GPT
from .tokenizer import load_encoder
from .tokens import TokenSplit, iter_docs, open_split, read_index, split_files
from .train import dist as tdist
from .train.config import TrainConfig
from .train.data import PackedRows, fixed_rows
from .train.dist import Dist
from .train.evaluate import bits_per_byte, token_bytes
from .train.governor import Governor, GovernorConfig
from .train.groups import GroupSpec, partition
from .train.loop import LM, Log, Result, fit
from .weights import load_model, save_model


class MidtrainConfig(Config):
    chat_sources: list[str] = ["math"]  # mix sources whose Question/Answer documents are also rendered as chats


class GovernConfig(StageConfig):
    groups: Annotated[list[GroupSpec], non_empty("parameter group")]
    governor: GovernorConfig = GovernorConfig()
    midtrain: MidtrainConfig = MidtrainConfig()
    train: TrainConfig


@dataclass(frozen=True)
class Midtrain:
    train: TokenSplit
    val_rows: np.ndarray
    tbytes: np.ndarray
    chat_docs: dict[str, int]  # split -> chat documents added


def _chats(mix_dir: Path, split: str, sources: list[str], enc: Any) -> list[np.ndarray]:
    out, seen = [], set()
    for path in split_files(mix_dir, split):
        for docs in iter_docs([path]):
            for doc_id, source, text in zip(docs.ids, docs.sources, docs.texts, strict=True):
                if source not in sources:
                    continue
                seen.add(source)
                turns = qa_turns(text)
                if turns is None:
                    raise InputError(path, f"document {doc_id!r} of source '{source}' is not 'Question: ... "
                                     "\\nAnswer: ...'", fix=f"remove '{source}' from params.yaml: "
                                     "govern.midtrain.chat_sources")
                out.append(render(enc, turns))
    if split == "train" and (missing := [s for s in sources if s not in seen]):
        raise ConfigError(f"params.yaml: govern.midtrain.chat_sources: {', '.join(missing)} not in the mix's "
                          f"train split (fix: name sources from params.yaml: mix.sources)")
    return out


def _with_docs(split: TokenSplit, docs: list[np.ndarray]) -> TokenSplit:
    """`split` followed by `docs` (each BOS-first), in memory."""
    if not docs:
        return split
    lengths = np.array([len(d) for d in docs], dtype=np.int64)
    tokens = np.concatenate([np.asarray(split.tokens)] + [d.astype(split.tokens.dtype) for d in docs])
    offsets = np.concatenate([split.offsets, int(split.offsets[-1]) + np.cumsum(lengths)])
    return TokenSplit(tokens=tokens, offsets=offsets, index={**split.index, "n_docs": len(offsets) - 1,
                                                             "n_tokens": len(tokens)}, bos_id=split.bos_id)


def prepare(cfg: GovernConfig, inputs: Mapping[str, str | Path]) -> Midtrain:
    tokens_dir, tokenizer_dir = Path(inputs["tokenizer/tokens"]), Path(inputs["tokenizer/tokenizer"])
    mix_dir = Path(inputs["mix/train"]).parent
    enc = load_encoder(tokenizer_dir)
    vocab = int(read_index(tokens_dir)["vocab_size"])
    sources = cfg.midtrain.chat_sources
    train_chats, val_chats = _chats(mix_dir, "train", sources, enc), _chats(mix_dir, "val", sources, enc)
    train = _with_docs(open_split(tokens_dir, "train"), train_chats)
    val = _with_docs(open_split(tokens_dir, "val"), val_chats)
    return Midtrain(train=train, val_rows=fixed_rows(val, cfg.train.seq_len, cfg.train.eval_rows),
                    tbytes=token_bytes(tokenizer_dir, vocab), chat_docs={"train": len(train_chats), "val": len(val_chats)})


def continue_training(cfg: GovernConfig, mid: Midtrain, model_dir: Path, *, governed: bool, dist: Dist,
                      ckpt_dir: Path | None, log: Log | None = None,
                      governor: GovernorConfig | None = None) -> tuple[GPT, Result, Governor | None]:
    """One continuation of the model in `model_dir`: governed (by `governor`, default
    cfg.governor) or not. The same data order and seed either way."""
    model, _ = load_model(model_dir)
    tcfg = cfg.train
    plugin = None
    if governed:
        groups = partition(model, cfg.groups, where="params.yaml: govern.groups")
        plugin = Governor(governor or cfg.governor, groups)
    torch.manual_seed(tcfg.seed)
    loader = PackedRows(mid.train, tcfg.seq_len, seed=tcfg.seed, rank=dist.rank, world=dist.world)
    result = fit(model, LM, loader, tcfg, dist=dist, total_steps=tcfg.total_steps(model.config.n_params()),
                 d_model=model.config.d_model, ckpt_dir=ckpt_dir, log=log, plugin=plugin,
                 evaluate=lambda m: bits_per_byte(m, mid.val_rows, mid.tbytes, dist, micro_batch=tcfg.micro_batch))
    for p in model.parameters():  # the saved model is a plain model again
        p.requires_grad_(True)
    return model, result, plugin


def run(cfg: GovernConfig, inputs: Mapping[str, str | Path], out_dir: str | Path,
        ctx: RunContext | None = None) -> dict[str, Any]:
    ctx = ctx or RunContext()
    out = Path(out_dir)
    model_dir, tokenizer_dir = Path(inputs["pretrain/model"]), Path(inputs["tokenizer/tokenizer"])
    dist = tdist.setup(cfg.train.device)
    try:
        cfg.train.check_processes(dist.world, "govern.train")
        mid = prepare(cfg, inputs)
        model, gov_run, gov = continue_training(cfg, mid, model_dir, governed=True, dist=dist,
                                                ckpt_dir=ctx.scratch / "governed", log=ctx.log_metrics)
        assert gov is not None

        def log_baseline(metrics: Mapping[str, Any], step: int) -> None:
            ctx.log_metrics({f"ungoverned/{k}": v for k, v in metrics.items()}, step)

        _, base_run, _ = continue_training(cfg, mid, model_dir, governed=False, dist=dist,
                                           ckpt_dir=ctx.scratch / "ungoverned", log=log_baseline)
        ctx.decisions.extend({"kind": "govern.transition", **e} for e in gov.events)
        governed, ungoverned = gov_run.evals[gov_run.steps], base_run.evals[base_run.steps]
        if dist.main:
            save_model(model.cpu(), out / "model", tokenizer_dir=tokenizer_dir)
            write_text(out / "governance.json", json.dumps({
                "groups": [{"name": g.name, "level": g.level, "params": list(g.params)} for g in gov.groups],
                "events": gov.events,
                "final_states": {k: v.state for k, v in gov.states.items()},
                "evaluations": gov.evals,
                "budget": {"budget": gov.cfg.budget, "max_sum": max(gov.budget_sums, default=0.0),
                           "steps_checked": len(gov.budget_sums)},
            }, indent=2, sort_keys=True) + "\n")
        return {
            "skipped_fraction": round(gov.skipped_fraction, 6),
            "val_loss_governed": round(governed["val_loss"], 6),
            "val_loss_ungoverned": round(ungoverned["val_loss"], 6),
            "val_loss_change": round(governed["val_loss"] / ungoverned["val_loss"] - 1.0, 6),
            "val_bpb_governed": round(governed["val_bpb"], 6),
            "val_bpb_ungoverned": round(ungoverned["val_bpb"], 6),
            "wall_clock_governed_s": round(gov_run.seconds, 1),
            "wall_clock_ungoverned_s": round(base_run.seconds, 1),
            "transitions": len(gov.events),
            "evaluations_governed": len(gov.evals),
            "groups": len(gov.groups),
            "steps": gov_run.steps,
            "tokens_seen": gov_run.tokens,
            "chat_docs": mid.chat_docs,
        }
    finally:
        tdist.teardown()
