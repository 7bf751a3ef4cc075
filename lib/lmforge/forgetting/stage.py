"""The `forgetting` stage: how much each method and each stage forgets, and the release gate.

    run(cfg, {"pretrain/model": dir, "govern/model": dir, "sft/model": dir, "rl/model": dir,
              "tokenizer/tokens": dir, "tokenizer/tokenizer": dir, "mix/train": dir, "mix/val": dir},
        out_dir, ctx=ctx)

1. Retention (lmforge.forgetting.retention): val bpb per mix source of every model of the DAG so
   far, and the gate on the final one. It runs first, so a refused model fails the stage at once
   (lmforge.errors.Refused; with gate.on_fail: warn it only warns). The decision is a
   `forgetting.gate` audit record either way.
2. The continual benchmark (lmforge.forgetting.continual) in quick or full mode: R matrices of
   next-token accuracy (and loss) per method and seed, ACC / BWT / FWT (lmforge.forgetting.metrics)
   as mean and std over seeds.

Writes `out_dir/matrices.json` (every run's matrices, and their means), `out_dir/plots/`
(`heatmap_<method>.png`, `acc_bwt.png`, `retention.png`) and returns the metrics. A finished
(method, seed) run is kept in `ctx.scratch`, so a killed stage resumes with the next one.
"""

from __future__ import annotations

import json
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import torch
from pydantic import model_validator
from tqdm import tqdm

from ..atomic import write_text
from ..config import Config, StageConfig, non_empty
from ..context import RunContext
from ..errors import ConfigError, Refused
from ..model import GPT
from ..pretrain import ModelSpec
from ..tokens import read_index
from ..train import dist as tdist
from ..train.config import TrainConfig
from ..train.evaluate import token_bytes
from ..weights import load_model
from . import continual, metrics, plots, retention
from .domains import source_splits
from .retention import GateConfig, RetentionConfig


class FullMode(Config):
    """What `mode: full` puts in place of the quick mode's budget."""

    steps: int = 400
    seeds: list[int] = [1, 2, 3, 4, 5]
    eval_rows: int = 0


class BenchmarkConfig(Config):
    enabled: bool = True
    mode: Literal["quick", "full"] = "quick"
    domains: list[str] = ["shakespeare", "kjv", "python_stdlib", "math"]  # mix sources, in training order
    seeds: list[int] = [1, 2, 3]
    eval_rows: int = 32                  # held-out rows per domain (0: all)
    init: Literal["pretrained", "scratch"] = "pretrained"  # the pretrain stage's model, or a fresh `model`
    model: ModelSpec = ModelSpec(depth=2)
    methods: Annotated[list[continual.Method], non_empty("method")]
    train: TrainConfig                   # per domain: train.steps is the quick mode's steps per domain
    full: FullMode = FullMode()

    @model_validator(mode="after")
    def _check(self) -> BenchmarkConfig:
        if len(self.domains) < 2 or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must name at least two different mix sources (got {self.domains})")
        names = [m.name for m in self.methods]
        if dupes := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"method names must be unique ({', '.join(dupes)} repeat)")
        for n in names:
            if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", n):
                raise ValueError(f"method name {n!r} must be letters, digits, '_' or '-' (it names files and metrics)")
        if not self.seeds or not self.full.seeds:
            raise ValueError("seeds must list at least one seed")
        if self.train.steps is None:
            raise ValueError("train.steps must be set: the steps per domain (tokens budgets are not used here)")
        return self

    def budget(self) -> tuple[TrainConfig, list[int], int]:
        """(train config, seeds, eval rows) of the selected mode."""
        if self.mode == "full":
            return self.train.model_copy(update={"steps": self.full.steps}), self.full.seeds, self.full.eval_rows
        return self.train, self.seeds, self.eval_rows


class ForgettingConfig(StageConfig):
    benchmark: BenchmarkConfig
    retention: RetentionConfig = RetentionConfig()
    gate: GateConfig = GateConfig()

    @model_validator(mode="after")
    def _gate(self) -> ForgettingConfig:
        for key in ("model", "reference"):
            if getattr(self.gate, key) not in self.retention.models:
                raise ValueError(f"gate.{key} {getattr(self.gate, key)!r} is not in retention.models "
                                 f"{self.retention.models}")
        return self


def _r(x: float) -> float:
    return round(float(x), 6)


def _model_dirs(cfg: ForgettingConfig, inputs: Mapping[str, str | Path]) -> dict[str, Path]:
    out = {}
    for name in cfg.retention.models:
        if f"{name}/model" not in inputs:
            raise ConfigError(f"params.yaml: forgetting.retention.models: data/{name}/model is not a dependency of "
                              f"the forgetting stage (fix: add it to stages.forgetting.deps in dvc.yaml, or drop '{name}')")
        out[name] = Path(inputs[f"{name}/model"])
    return out


def _gate(cfg: ForgettingConfig, tab: dict[str, dict[str, Any]], ctx: RunContext) -> dict[str, Any]:
    decision = retention.decide(tab, cfg.gate)
    ctx.decisions.append(decision)
    if decision["action"] == "fail":
        raise Refused(retention.refusal_message(decision))
    if decision["action"] == "warn":
        print(f"lmforge forgetting: warning (gate.on_fail: warn): {retention.refusal_message(decision)}", file=sys.stderr)
    return decision


def _benchmark(cfg: BenchmarkConfig, inputs: Mapping[str, str | Path], tbytes: np.ndarray, vocab: int,
               dist: tdist.Dist, ctx: RunContext) -> dict[str, dict[int, dict[str, Any]]]:
    tcfg, seeds, eval_rows = cfg.budget()
    tcfg = tcfg.model_copy(update={"progress": False})  # one bar for the whole benchmark instead
    tokens_dir, mix_dir = Path(inputs["tokenizer/tokens"]), Path(inputs["mix/val"]).parent
    doms = continual.domains(source_splits(tokens_dir, mix_dir, "train", cfg.domains),
                             source_splits(tokens_dir, mix_dir, "val", cfg.domains), tcfg.seq_len, eval_rows)

    def init(seed: int) -> GPT:
        if cfg.init == "pretrained":
            return load_model(inputs["pretrain/model"])[0]
        torch.manual_seed(seed)
        return GPT(cfg.model.build(vocab, tcfg.seq_len))

    runs: dict[str, dict[int, dict[str, Any]]] = {}
    bar = tqdm(total=len(cfg.methods) * len(seeds), unit="run", disable=not cfg.train.progress, dynamic_ncols=True)
    for method in cfg.methods:
        for seed in seeds:
            bar.set_description(f"{method.name} seed {seed}")
            done = ctx.scratch / f"{method.name}-{seed}.json"  # the scratch dir is keyed by params and inputs
            if done.exists():
                run = json.loads(done.read_text())
            else:
                run = continual.run_sequence(method, seed, init, doms, tcfg, tbytes, dist)
                write_text(done, json.dumps(run))
            runs.setdefault(method.name, {})[seed] = run
            gem = metrics.gem(*continual.matrix(run, "val_acc"))
            ctx.log_metrics({f"{method.name}/{k}": v for k, v in gem.items()}, seed)
            bar.update(1)
    bar.close()
    return runs


def _summaries(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out = {}
    for name, by_seed in runs.items():
        acc = metrics.summarise([metrics.gem(*continual.matrix(r, "val_acc")) for r in by_seed.values()])
        loss = metrics.summarise([metrics.gem(*continual.matrix(r, "val_loss", -1.0)) for r in by_seed.values()])
        out[name] = {k: {s: _r(v) for s, v in acc[k].items()} for k in acc} | {
            "on_neg_loss": {k: {s: _r(v) for s, v in loss[k].items()} for k in loss}}
    return out


def _mean_matrices(by_seed: dict[int, dict[str, Any]], key: str) -> tuple[np.ndarray, np.ndarray]:
    mats = [continual.matrix(r, key) for r in by_seed.values()]
    return np.mean([m[0] for m in mats], axis=0), np.mean([m[1] for m in mats], axis=0)


def _write(out: Path, cfg: BenchmarkConfig, runs: dict[str, dict[int, dict[str, Any]]],
           summary: dict[str, dict[str, Any]], tab: dict[str, dict[str, Any]]) -> None:
    (out / "plots").mkdir(parents=True, exist_ok=True)
    matrices: dict[str, Any] = {"domains": cfg.domains, "rows": "after training on domain i (init: before any)",
                                "methods": {}}
    for name, by_seed in runs.items():
        R, b = _mean_matrices(by_seed, "val_acc")
        Rl, bl = _mean_matrices(by_seed, "val_loss")
        matrices["methods"][name] = {
            "mean": {"val_acc": {"init": [_r(x) for x in b], "R": [[_r(x) for x in row] for row in R]},
                     "val_loss": {"init": [_r(x) for x in bl], "R": [[_r(x) for x in row] for row in Rl]}},
            "seeds": {str(seed): {"init": run["b"], "R": run["R"]} for seed, run in by_seed.items()},
        }
        plots.heatmap(R, b, cfg.domains, f"{name}: next-token accuracy (mean of {len(by_seed)} seeds)",
                      out / "plots" / f"heatmap_{name}.png")
    write_text(out / "matrices.json", json.dumps(matrices, indent=1, sort_keys=True) + "\n")
    if summary:
        plots.acc_bwt_bars(summary, out / "plots" / "acc_bwt.png")
    plots.retention_bars(tab, out / "plots" / "retention.png")


def run(cfg: ForgettingConfig, inputs: Mapping[str, str | Path], out_dir: str | Path,
        ctx: RunContext | None = None) -> dict[str, Any]:
    ctx = ctx or RunContext()
    out = Path(out_dir)
    tokens_dir, tokenizer_dir = Path(inputs["tokenizer/tokens"]), Path(inputs["tokenizer/tokenizer"])
    bench = cfg.benchmark
    dist = tdist.setup(bench.train.device)
    try:
        if dist.enabled:
            raise ConfigError("the forgetting stage runs in one process (fix: run it without torchrun)")
        vocab = int(read_index(tokens_dir)["vocab_size"])
        tbytes = token_bytes(tokenizer_dir, vocab)
        val = source_splits(tokens_dir, Path(inputs["mix/val"]).parent, "val")
        tab = retention.table(_model_dirs(cfg, inputs), val, tbytes, cfg.retention, dist)
        decision = _gate(cfg, tab, ctx)
        runs = _benchmark(bench, inputs, tbytes, vocab, dist, ctx) if bench.enabled else {}
        summary = _summaries(runs)
        _write(out, bench, runs, summary, tab)
        tcfg, seeds, eval_rows = bench.budget()
        ref = tab[cfg.gate.reference]["val_bpb"]
        return {
            "benchmark": {"mode": bench.mode, "init": bench.init, "domains": bench.domains, "seeds": seeds,
                          "steps_per_domain": tcfg.steps, "eval_rows": eval_rows, "score": "next-token accuracy",
                          "methods": summary} if bench.enabled else {"enabled": False},
            "retention": {name: {"val_bpb": _r(row["val_bpb"]), "change": _r(row["val_bpb"] / ref - 1.0),
                                 "by_source": {s: _r(v) for s, v in sorted(row["by_source"].items())}}
                          for name, row in tab.items()},
            "gate": {k: decision[k] for k in ("model", "reference", "increase", "max_increase", "passed", "action")},
        }
    finally:
        tdist.teardown()
