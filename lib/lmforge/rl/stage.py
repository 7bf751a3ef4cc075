"""The `rl` stage: DPO, then GRPO with verifiable rewards, on the SFT model, in the one training loop.

Problems and held-out problems are the graded conversations of `data/sft/conversations.parquet`
(so a prompt held out from SFT is held out here too) whose set is in `rl.problems.sources`.
DPO (lmforge.rl.dpo) trains on verifiable preference pairs (lmforge.rl.pairs) from the train
split and is scored by the held-out chosen-vs-rejected margin. GRPO (lmforge.rl.grpo) then
trains on the train problems; held-out problems are scored greedily (pass@1) and by `pass_k`
samples (pass@k) before, during and after. Either can be switched off. The reference of both
is the SFT model, frozen (DPO's reference, GRPO's KL anchor).

The order is Tülu 3's (SFT, DPO, RL with verifiable rewards): with DPO after GRPO, DPO gave
back most of GRPO's held-out gain in both runs measured (bench/results/rl_dpo.md). `data/rl/metrics.json` holds `heldout_accuracy_sft`,
`heldout_accuracy_rl`, `heldout_n`, the paired gain and its standard error, pass@k, KL, and
the DPO margins.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from pydantic import model_validator

from ..config import Config, StageConfig
from ..context import RunContext
from ..data.chats import Conversation, from_table
from ..errors import ConfigError, InputError
from ..sft import answers, exact_match
from ..tokenizer import load_encoder
from ..train import dist as tdist
from ..train.config import TrainConfig
from ..train.dist import Dist
from ..train.loop import fit
from ..weights import load_model, save_model
from . import dpo, grpo
from .pairs import Pair, build_pairs, read_pairs


class Problems(Config):
    sources: list[str] = ["drills"]   # conversation sets of the sft stage used as RL tasks
    heldout_n: int = 300              # held-out problems scored (at least 200 for the test)


class GRPOConfig(Config):
    enabled: bool = True
    prompts_per_step: int = 16
    group_size: int = 8
    temperature: float = 1.0
    top_k: int | None = None
    max_new_tokens: int = 32
    format_weight: float = 0.1        # reward for a well-formed final `#### N`, right or wrong
    kl_coef: float = 0.02             # weight of the KL penalty to the reference; 0 disables it
    clip: float = 0.2                 # PPO ratio clip
    ppo_epochs: int = 1               # optimizer steps per rollout
    scale_advantages: bool = True     # divide by the group's reward std
    train: TrainConfig

    @model_validator(mode="after")
    def _fit(self) -> GRPOConfig:
        if self.prompts_per_step < 1 or self.group_size < 2:
            raise ValueError("prompts_per_step must be >= 1 and group_size >= 2 (advantages compare a group)")
        if self.train.global_batch != self.prompts_per_step * self.group_size:
            raise ValueError(f"train.global_batch ({self.train.global_batch}) must be prompts_per_step x group_size "
                             f"= {self.prompts_per_step * self.group_size}")
        if self.ppo_epochs < 1 or self.train.ckpt_every % self.ppo_epochs:
            raise ValueError(f"ppo_epochs must be >= 1 and divide train.ckpt_every ({self.train.ckpt_every})")
        if not 0 < self.clip < 1 or self.kl_coef < 0 or self.temperature <= 0:
            raise ValueError("need 0 < clip < 1, kl_coef >= 0, temperature > 0")
        return self


class DPOConfig(Config):
    enabled: bool = True
    sources: list[str] = ["drills"]   # sft sets whose graded conversations become verifiable pairs
    files: list[str] = []             # your own pairs: jsonl of {"messages", "chosen", "rejected"} (train only)
    beta: float = 0.1
    nll_weight: float = 1.0           # RPO: + weight x the chosen reply's mean token NLL; 0 is plain DPO
    heldout_pairs: int = 256
    seed: int = 11
    train: TrainConfig

    @model_validator(mode="after")
    def _beta(self) -> DPOConfig:
        if self.beta <= 0 or self.nll_weight < 0:
            raise ValueError(f"need beta > 0 and nll_weight >= 0 (got {self.beta}, {self.nll_weight})")
        return self


class RLEval(Config):
    pass_k: int = 8
    temperature: float = 1.0
    batch: int = 128


class RLConfig(StageConfig):
    problems: Problems = Problems()
    grpo: GRPOConfig
    dpo: DPOConfig
    eval: RLEval = RLEval()

    def input_paths(self) -> list[str]:
        return list(self.dpo.files) if self.dpo.enabled else []


def _graded(df: pd.DataFrame, split: str, sources: list[str]) -> list[Conversation]:
    rows = df[(df["split"] == split) & df["answer"].notna() & df["source"].isin(sources)]
    return from_table(rows.sort_values("prompt_sha256"))


def score(model: torch.nn.Module, enc: Any, problems: list[Conversation], cfg: RLConfig, seed: int) -> dict[str, Any]:
    """pass@1 (greedy; per-problem results kept for the paired test) and pass@k (k samples)."""
    n_new = cfg.grpo.max_new_tokens
    greedy = [r[0] for r in exact_match(answers(model, enc, problems, max_new_tokens=n_new, batch=cfg.eval.batch),
                                        problems)]
    sampled = exact_match(answers(model, enc, problems, max_new_tokens=n_new, batch=cfg.eval.batch,
                                  temperature=cfg.eval.temperature, samples=cfg.eval.pass_k, seed=seed), problems)
    return {"pass_at_1": float(np.mean(greedy)), f"pass_at_{cfg.eval.pass_k}": float(np.mean([any(s) for s in sampled])),
            "sample_accuracy": float(np.mean(sampled)), "greedy": greedy}


def paired_gain(before: list[bool], after: list[bool]) -> tuple[float, float]:
    """Mean of after - before over the same problems and its standard error."""
    d = np.asarray(after, dtype=float) - np.asarray(before, dtype=float)
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else float("nan")


def _log(ctx: RunContext, prefix: str):  # type: ignore[no-untyped-def]
    def log(metrics: Mapping[str, Any], step: int) -> None:
        ctx.log_metrics({f"{prefix}{k}": v for k, v in metrics.items()}, step)
    return log


def _frozen(model: torch.nn.Module) -> torch.nn.Module:
    ref = copy.deepcopy(model).eval()
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref


def run_grpo(model: torch.nn.Module, ref: torch.nn.Module, enc: Any, train: list[Conversation],
             held: list[Conversation], cfg: RLConfig, dist: Dist, ctx: RunContext) -> dict[str, Any]:
    g, t = cfg.grpo, cfg.grpo.train
    data = grpo.Rollouts(model, ref, enc, train, prompts_per_step=g.prompts_per_step, group_size=g.group_size,
                         temperature=g.temperature, top_k=g.top_k, max_new_tokens=g.max_new_tokens,
                         format_weight=g.format_weight, scale=g.scale_advantages, ppo_epochs=g.ppo_epochs,
                         seed=t.seed, rank=dist.rank, world=dist.world, log=ctx.log_metrics if dist.main else None)
    torch.manual_seed(t.seed)
    result = fit(model, grpo.objective(clip=g.clip, kl_coef=g.kl_coef), data, t, dist=dist,
                 total_steps=t.total_steps(0), d_model=model.config.d_model, ckpt_dir=ctx.scratch / "grpo",
                 log=_log(ctx, "grpo/"), evaluate=lambda m: {
                     k: v for k, v in score(m, enc, held, cfg, seed=t.seed).items() if k != "greedy"})
    return {"steps": result.steps, "evals": result.evals}


def run_dpo(model: torch.nn.Module, ref: torch.nn.Module, enc: Any, df: pd.DataFrame, user_pairs: list[Pair],
            cfg: RLConfig, dist: Dist, ctx: RunContext) -> dict[str, Any]:
    d, t = cfg.dpo, cfg.dpo.train
    train = build_pairs(_graded(df, "train", d.sources), d.seed) + user_pairs
    held = build_pairs(_graded(df, "heldout", d.sources), d.seed)[:d.heldout_pairs]
    if not train or not held:
        raise ConfigError(f"params.yaml: rl.dpo.sources {d.sources}: no verifiable preference pairs in "
                          f"data/sft/conversations.parquet (fix: name sets of sft.data.sets with exact answers)")
    before, before_chosen = dpo.margin(model, enc, held, t.micro_batch), dpo.chosen_logp(model, enc, held, t.micro_batch)
    data = dpo.PairBatches(enc, train, ref, seed=t.seed, micro_batch=t.micro_batch,
                           rank=dist.rank, world=dist.world)
    torch.manual_seed(t.seed)
    result = fit(model, dpo.objective(beta=d.beta, nll_weight=d.nll_weight), data, t, dist=dist, total_steps=t.total_steps(0),
                 d_model=model.config.d_model, ckpt_dir=ctx.scratch / "dpo", log=_log(ctx, "dpo/"),
                 evaluate=lambda m: {"heldout_margin": dpo.margin(m, enc, held, t.micro_batch)})
    return {"dpo_margin_before": before, "dpo_margin_after": result.evals[result.steps]["heldout_margin"],
            "dpo_chosen_logp_before": before_chosen, "dpo_chosen_logp_after": dpo.chosen_logp(model, enc, held, t.micro_batch),
            "dpo_pairs_train": len(train), "dpo_pairs_heldout": len(held), "dpo_steps": result.steps}


def run(cfg: RLConfig, inputs: Mapping[str, str | Path], out_dir: str | Path,
        ctx: RunContext | None = None) -> dict[str, Any]:
    ctx = ctx or RunContext()
    out = Path(out_dir)
    convs_path = Path(inputs["sft/conversations.parquet"])
    try:
        df = pd.read_parquet(convs_path)
    except Exception as e:  # pyarrow raises several kinds for a damaged file
        raise InputError(convs_path, f"cannot read ({e})", fix="re-run the sft stage") from None
    unknown = sorted(set(cfg.problems.sources) - set(df["source"]))
    if unknown:
        raise ConfigError(f"params.yaml: rl.problems.sources: {', '.join(unknown)} not among the sft stage's sets "
                          f"({', '.join(sorted(set(df['source'])))})")
    train, held = _graded(df, "train", cfg.problems.sources), _graded(df, "heldout", cfg.problems.sources)
    held = held[:cfg.problems.heldout_n]
    user_pairs = [p for f in cfg.dpo.files for p in read_pairs(f)] if cfg.dpo.enabled else []  # fail before work
    if not train or not held:
        raise ConfigError("params.yaml: rl.problems: no graded train or held-out problems (fix: more sft.data sets)")
    dist = tdist.setup(cfg.grpo.train.device)
    try:
        cfg.grpo.train.check_processes(dist.world, "rl.grpo.train")
        cfg.dpo.train.check_processes(dist.world, "rl.dpo.train")
        model, _ = load_model(inputs["sft/model"], device=dist.device)
        tokenizer_dir = Path(inputs["sft/model"]) / "tokenizer"
        enc = load_encoder(tokenizer_dir)
        ref = _frozen(model)  # the SFT model: DPO's reference and GRPO's KL anchor
        sft_score = score(model, enc, held, cfg, seed=0)
        metrics: dict[str, Any] = {"heldout_n": len(held), "train_problems": len(train)}
        if cfg.dpo.enabled:
            metrics |= run_dpo(model, ref, enc, df, user_pairs, cfg, dist, ctx)
        dpo_score = score(model, enc, held, cfg, seed=0) if cfg.dpo.enabled else sft_score
        if cfg.grpo.enabled:
            metrics["grpo_steps"] = run_grpo(model, ref, enc, train, held, cfg, dist, ctx)["steps"]
        rl_score = score(model, enc, held, cfg, seed=0) if cfg.grpo.enabled else dpo_score
        gain, se = paired_gain(sft_score["greedy"], rl_score["greedy"])
        k = f"pass_at_{cfg.eval.pass_k}"
        metrics |= {
            "heldout_accuracy_sft": sft_score["pass_at_1"], "heldout_accuracy_dpo": dpo_score["pass_at_1"],
            "heldout_accuracy_rl": rl_score["pass_at_1"], "heldout_gain": gain, "heldout_gain_se": se,
            f"heldout_{k}_sft": sft_score[k], f"heldout_{k}_rl": rl_score[k],
        }
        if dist.main:
            save_model(model.cpu(), out / "model", tokenizer_dir=tokenizer_dir)
        return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}
    finally:
        tdist.teardown()
