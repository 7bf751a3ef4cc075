"""The training loop's knobs: one `TrainConfig` block that every training stage embeds.

In params.yaml it is the `train:` block of a stage (pretrain, and later govern, sft, rl, ...):

    train:
      seq_len: 256            # tokens per row
      micro_batch: 8          # rows per forward pass, per process
      global_batch: 32        # rows per optimizer step, all processes together
      steps: null             # or tokens: N, or tokens_per_param: 20 (Chinchilla-style budget)
      optim: {...}            # Muon for matrices, AdamW for embeddings, norms and head
      schedule: {...}         # warmup - stable - decay
"""

from __future__ import annotations

from typing import Literal

from pydantic import model_validator

from ..config import Config
from ..errors import ConfigError


class OptimConfig(Config):
    """Muon (torch.optim.Muon) for the 2-D weight matrices of the blocks, AdamW for the rest;
    `matrix: adamw` trains everything with AdamW. Learning rates are peak values."""

    matrix: Literal["muon", "adamw"] = "muon"
    matrix_lr: float = 0.02        # Muon (or AdamW) lr of the block matrices
    embedding_lr: float = 0.1      # AdamW lr of the input embedding
    head_lr: float = 0.004         # AdamW lr of the untied output head
    scalar_lr: float = 0.02        # AdamW lr of norm weights
    betas: tuple[float, float] = (0.8, 0.95)
    eps: float = 1e-10
    weight_decay: float = 0.0      # on the block matrices only
    muon_momentum: float = 0.95
    lr_scale_dim: int = 768        # AdamW lrs scale by (d_model / lr_scale_dim) ** -0.5 (nanochat)


class ScheduleConfig(Config):
    """Warmup - stable - decay: linear warmup over `warmup_frac` of the steps, flat, then a
    linear decay to `final_lr_frac` of the peak over the last `decay_frac` of the steps."""

    warmup_frac: float = 0.0
    decay_frac: float = 0.2
    final_lr_frac: float = 0.0

    @model_validator(mode="after")
    def _fractions(self) -> ScheduleConfig:
        for key in ("warmup_frac", "decay_frac", "final_lr_frac"):
            if not 0.0 <= getattr(self, key) <= 1.0:
                raise ValueError(f"{key} must be within [0, 1] (got {getattr(self, key)})")
        if self.warmup_frac + self.decay_frac > 1.0:
            raise ValueError(f"warmup_frac + decay_frac = {self.warmup_frac + self.decay_frac} exceeds 1")
        return self


class TrainConfig(Config):
    seed: int = 1337
    seq_len: int = 256
    micro_batch: int = 8
    global_batch: int = 32
    # The budget: exactly one of steps, tokens, tokens_per_param (tokens per model parameter).
    steps: int | None = None
    tokens: int | None = None
    tokens_per_param: float | None = None
    grad_clip: float = 1.0         # max global gradient norm; 0 disables clipping
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    eval_every: int = 50           # steps between validation passes (and one at the end)
    eval_rows: int = 64            # validation rows per pass (all processes); 0 = the whole split
    ckpt_every: int = 25           # steps between resumable checkpoints in the scratch dir
    log_every: int = 1             # steps between MLflow loss points
    device: Literal["auto", "cpu", "cuda"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False          # torch.compile the model (on the CPU: needs a C++ compiler)
    # Under torchrun: ddp keeps a whole replica of weights, gradients and optimizer state in
    # every process; fsdp (FSDP2) shards all three across the processes, for models whose
    # training state does not fit one device. One process ignores it. (lmforge.train.shard)
    parallel: Literal["ddp", "fsdp"] = "ddp"
    progress: bool = True          # tqdm bar with tokens/s (and MFU on GPU)

    @model_validator(mode="after")
    def _check(self) -> TrainConfig:
        budgets = [k for k in ("steps", "tokens", "tokens_per_param") if getattr(self, k) is not None]
        if len(budgets) != 1:
            raise ValueError(f"set exactly one of steps, tokens, tokens_per_param (got {budgets or 'none'})")
        for key in ("seq_len", "micro_batch", "global_batch", "eval_every", "ckpt_every", "log_every"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"global_batch {self.global_batch} must be a multiple of micro_batch {self.micro_batch}")
        return self

    def accum_steps(self, world: int) -> int:
        """Micro-batches per process per optimizer step."""
        per_step = self.micro_batch * world
        if self.global_batch % per_step:
            raise ValueError(f"global_batch {self.global_batch} is not divisible by micro_batch x processes "
                             f"= {self.micro_batch} x {world}; change global_batch or micro_batch")
        return self.global_batch // per_step

    def check_processes(self, world: int, where: str) -> int:
        """`accum_steps`, or a ConfigError naming the params section `where` (e.g. "sft.train")."""
        try:
            return self.accum_steps(world)
        except ValueError as e:
            raise ConfigError(f"params.yaml: {where}: {e}") from None

    def total_steps(self, n_params: int) -> int:
        if self.steps is not None:
            return self.steps
        tokens = self.tokens if self.tokens is not None else int(self.tokens_per_param * n_params)  # type: ignore[operator]
        return max(1, tokens // (self.global_batch * self.seq_len))
