"""THE training loop. Every training stage calls `fit`; they differ by objective and data only.

    result = fit(model, LM, loader, cfg, dist=dist, total_steps=n, ckpt_dir=ctx.scratch / "ckpt",
                 evaluate=lambda m: {...}, log=ctx.log_metrics, flops_per_token=f)

- `objective` is an `Objective`: `loss(model, batch)` returns the summed loss over the batch's
  counted targets and `count(batch)` how many there are. The loop divides by the step's total
  count over every micro-batch and process, so the gradient is that of the mean loss of the
  global batch whatever the split into micro-batches and processes.
- `data` gives `next_step(global_batch, micro_batch)` (this process's micro-batches of the next
  step) and `state_dict()` / `load_state_dict()` (its position).
- Optimizers (Muon + AdamW, lmforge.train.optim), the warmup-stable-decay schedule, gradient
  accumulation, clipping, bf16 autocast, torch.compile (Inductor: Triton kernels on CUDA, C++
  on the CPU, which needs a C++ compiler); under torchrun DDP, or
  FSDP2 (`parallel: fsdp`: a sharded working copy, see lmforge.train.shard; `model` receives its
  weights for each evaluation and at the end).
- Every `eval_every` steps and at the end, `evaluate(model)` (validation loss, bpb, ...).
- `log(metrics, step)` receives curves by step: `train/loss`, `train/lr_mult`, `train/grad_norm`,
  `train/tokens`, and `eval/<name>` for each evaluation (rank 0 only).
- A `plugin` (e.g. lmforge.train.governor.Governor) may freeze parameters, scale each of its
  optimizer param groups' lr and ask for evaluations; see `Plugin`. With a plugin, evaluations
  run when it asks (and at the end) instead of every `eval_every` steps.
- Every `ckpt_every` steps, a checkpoint of model, optimizers, data position and RNG states in
  `ckpt_dir`; a run started with a checkpoint there resumes from it and ends with the same
  weights as an uninterrupted run (bit for bit on CPU).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from ..errors import ConfigError
from . import checkpoint, optim, shard
from .config import TrainConfig
from .dist import Dist, all_sum, barrier

Batch = dict[str, torch.Tensor]
Evaluate = Callable[[nn.Module], Mapping[str, float]]
Log = Callable[[Mapping[str, Any], int], None]

# Dense bf16 peak FLOP/s per device, for MFU (the denominator nanochat and others use).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "B200": 2250e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}

# Compiled graphs kept per function when a plug-in freezes groups (one per set of frozen groups).
RECOMPILE_LIMIT = 64


class Data(Protocol):
    def next_step(self, global_batch: int, micro_batch: int) -> list[Batch]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class Plugin(Protocol):
    """A training plug-in: the loop calls these hooks, in this order, each step."""

    def split(self) -> Mapping[str, str]: ...        # parameter name -> the plug-in's group (optim.build)
    def attach(self, model: nn.Module, opts: list[torch.optim.Optimizer], total_steps: int) -> None: ...
    def before_step(self, step: int) -> bool: ...      # before set_lr; True: trainable set changed
    def before_update(self, step: int) -> None: ...    # gradients final (clipped), weights not yet updated
    def after_update(self, step: int) -> bool: ...     # weights updated, gradients held; True: evaluate
    def on_eval(self, step: int, metrics: dict[str, float]) -> None: ...
    def metrics(self) -> dict[str, float]: ...         # curves logged with train/*
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass(frozen=True)
class Objective:
    name: str
    loss: Callable[[nn.Module, Batch], torch.Tensor]
    count: Callable[[Batch], int]


def _lm_loss(model: nn.Module, batch: Batch) -> torch.Tensor:
    # the model's own loss (a fused cross-entropy) is the mean over counted targets
    n = _lm_count(batch)
    if n == 0:  # nothing to learn from here, but every process must still run the same graph
        return model(batch["inputs"]).sum() * 0.0
    return model(batch["inputs"], batch["targets"]) * n


def _lm_count(batch: Batch) -> int:
    return int((batch["targets"] != -1).sum())


LM = Objective("lm", _lm_loss, _lm_count)  # next-token prediction; targets -1 are ignored


@dataclass
class Result:
    steps: int
    tokens: int
    resumed_from: int | None
    evals: dict[int, dict[str, float]] = field(default_factory=dict)  # step -> metrics
    train_loss: float = float("nan")
    tokens_per_s: float = 0.0
    mfu: float | None = None
    seconds: float = 0.0  # wall-clock of the steps this call ran (evaluations included)


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_BF16_FLOPS.items() if k in name), None)


def autocast_for(cfg: TrainConfig, device: torch.device) -> contextlib.AbstractContextManager:
    bf16 = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def _to(batch: Batch, device: torch.device) -> Batch:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def _check_shardable(plugin: Plugin | None, data: Data) -> None:
    if plugin is not None:
        raise ConfigError("train.parallel: fsdp does not combine with a training plug-in (the governor freezes "
                          "and thaws parameter groups, which the sharded copy does not support); use parallel: ddp")
    if getattr(data, "follows_model", False):
        raise ConfigError("train.parallel: fsdp: this stage's batches are sampled from the model being trained "
                          "(RL rollouts), which the sharded copy does not support; use parallel: ddp")


def _check_compiler(cfg: TrainConfig, device: torch.device) -> None:
    """torch.compile on the CPU builds C++ kernels: refuse up front, by name, where no compiler
    works (Inductor would fail at the first step, deep inside the compile)."""
    if not cfg.compile or device.type != "cpu":
        return
    from torch._inductor.cpp_builder import get_cpp_compiler
    from torch._inductor.exc import InvalidCxxCompiler
    try:
        get_cpp_compiler()
    except InvalidCxxCompiler:
        raise ConfigError("train.compile: true on the CPU needs a C++ compiler, and none works here (torch "
                          "runs $CXX, or g++ where CXX is unset): install one (Debian: apt install g++) or set "
                          "train.compile: false") from None


def fit(model: nn.Module, objective: Objective, data: Data, cfg: TrainConfig, *, dist: Dist, total_steps: int,
        d_model: int, ckpt_dir: Path | None = None, evaluate: Evaluate | None = None, log: Log | None = None,
        flops_per_token: float | None = None, plugin: Plugin | None = None) -> Result:
    device = dist.device
    _check_compiler(cfg, device)
    sharded = cfg.parallel == "fsdp" and dist.enabled
    if sharded:
        _check_shardable(plugin, data)
        work = shard.shard(model.cpu(), dist)  # `model` waits on the CPU; the copy's shards train
    else:
        work = model.to(device)
    work.train()
    opts = optim.build(work, cfg.optim, d_model, fused=device.type == "cuda",
                       split=plugin.split() if plugin is not None else None)
    result = Result(steps=0, tokens=0, resumed_from=None)
    start = 0
    if ckpt_dir is not None and (ckpt := checkpoint.latest(ckpt_dir)) is not None:
        state = checkpoint.load(ckpt, work, opts)
        data.load_state_dict(state["data"])
        start, result.tokens, result.resumed_from = state["step"], state["tokens"], state["step"]
        result.evals = {int(k): v for k, v in state["evals"].items()}
        if plugin is not None:
            plugin.load_state_dict(state["plugin"])
        if dist.main:
            print(f"lmforge: resuming from checkpoint {ckpt} (step {start} of {total_steps})", file=sys.stderr)
    if plugin is not None:
        plugin.attach(model, opts, total_steps)

    def wrap() -> nn.Module:
        net: nn.Module = DistributedDataParallel(model) if dist.enabled and not sharded else work
        return torch.compile(net) if cfg.compile else net

    def current() -> nn.Module:
        """`model` holding the trained weights (gathered from the shards when sharded)."""
        if sharded:
            shard.gather_into(work, model.to(device))
        return model

    net = wrap()
    autocast = autocast_for(cfg, device)
    tokens_per_step = cfg.global_batch * cfg.seq_len
    peak = peak_flops(device)
    emit = log if (log is not None and dist.main) else None

    def run_eval(step: int) -> None:
        if evaluate is not None:
            with autocast:
                result.evals[step] = dict(evaluate(current()))
            if sharded:
                model.cpu()
            if emit:
                emit({f"eval/{k}": v for k, v in result.evals[step].items()}, step)
            if plugin is not None:
                plugin.on_eval(step, result.evals[step])

    if start == 0:
        run_eval(0)
    bar = tqdm(total=total_steps, initial=start, disable=not (cfg.progress and dist.main), unit="step",
               dynamic_ncols=True, mininterval=1.0)
    t_start, timed_tokens, t0 = None, 0, time.perf_counter()
    # Under torch.compile each set of parameters that require gradients is its own graph: a
    # plug-in that freezes and thaws groups makes more of them than Dynamo keeps by default (8),
    # after which it would run the rest of the training eagerly.
    graphs = (torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT) if cfg.compile and plugin is not None
              else contextlib.nullcontext())
    with graphs:
        for step in range(start, total_steps):
            if plugin is not None and plugin.before_step(step) and dist.enabled:
                net = wrap()  # DDP reduces the gradients of the parameters that required them when wrapped
            mult = optim.wsd(step, total_steps, cfg.schedule)
            optim.set_lr(opts, mult)
            batches = data.next_step(cfg.global_batch, cfg.micro_batch)
            n_total = all_sum([float(sum(objective.count(b) for b in batches))], dist)[0]
            loss_sum = torch.zeros((), device=device, dtype=torch.float64)
            for i, batch in enumerate(batches):
                last = i == len(batches) - 1
                if sharded:  # as DDP's no_sync: reduce-scatter once per step, after the last micro-batch
                    work.set_requires_gradient_sync(last)  # type: ignore[operator]
                sync = contextlib.nullcontext() if last or not dist.enabled or sharded else net.no_sync()
                with sync:
                    with autocast:
                        loss = objective.loss(net, _to(batch, device))
                    # DDP averages gradients over processes: scale so the result is the global mean
                    if loss.requires_grad:  # False only when a plug-in froze every parameter
                        (loss * (dist.world / max(n_total, 1.0))).backward()
                loss_sum += loss.detach()
            grad_norm = shard.clip_grad_norm(work.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
            if plugin is not None:
                plugin.before_update(step)
            for opt in opts:
                opt.step()
            want_eval = plugin.after_update(step) if plugin is not None else (step + 1) % cfg.eval_every == 0
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            train_loss = all_sum([float(loss_sum)], dist)[0] / max(n_total, 1.0)
            result.steps, result.tokens, result.train_loss = step + 1, result.tokens + tokens_per_step, train_loss
            # throughput from the second step on (the first pays for warm-up and compilation)
            if t_start is None:
                t_start = time.perf_counter()
            else:
                timed_tokens += tokens_per_step
                result.tokens_per_s = timed_tokens / (time.perf_counter() - t_start)
                if peak and flops_per_token:
                    result.mfu = flops_per_token * result.tokens_per_s / (peak * dist.world)
            if emit and ((step + 1) % cfg.log_every == 0 or step + 1 == total_steps):
                point = {"train/loss": train_loss, "train/lr_mult": mult, "train/tokens": result.tokens}
                if grad_norm is not None:
                    point["train/grad_norm"] = grad_norm
                emit(point | (plugin.metrics() if plugin is not None else {}), step + 1)
            bar.update(1)
            bar.set_postfix_str(f"loss {train_loss:.3f} {result.tokens_per_s:,.0f} tok/s"
                                + (f" MFU {100 * result.mfu:.1f}%" if result.mfu else ""), refresh=False)
            if want_eval or step + 1 == total_steps:
                run_eval(step + 1)
            if ckpt_dir is not None and (step + 1) % cfg.ckpt_every == 0 and step + 1 < total_steps:
                if dist.main or sharded:  # gathering shards takes every process; rank 0 writes
                    checkpoint.save(ckpt_dir, step + 1, work, opts, {
                        "data": data.state_dict(), "tokens": result.tokens,
                        "evals": {str(k): v for k, v in result.evals.items()},
                        "plugin": plugin.state_dict() if plugin is not None else None}, write=dist.main)
                barrier(dist)
    bar.close()
    if sharded:
        current()
    result.seconds = time.perf_counter() - t0
    return result
