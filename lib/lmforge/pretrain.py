"""The `pretrain` stage: a model trained from scratch on the token shards.

    run(cfg, {"tokenizer/tokens": dir, "tokenizer/tokenizer": dir}, out_dir, ctx=ctx)

writes `out_dir/model/` (a model directory: lmforge.weights) and returns the metrics:
`val_bpb`, `val_loss`, `unigram_val_bpb` (the unigram floor on the same validation targets),
`tokens_seen`, `steps`, `n_params` and the model's shape. Throughput (tokens/s, MFU) is
measured too but goes to the tracking run, not metrics.json, which must be byte-identical
across re-runs. Checkpoints go to `ctx.scratch`, so a killed run resumes where it stopped.

The model comes from the depth dial (`model.depth`, see lmforge.model.ModelConfig.from_depth),
the budget from `train.steps`, `train.tokens` or `train.tokens_per_param`.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .config import Config, StageConfig
from .context import RunContext
from .errors import ConfigError
from .model import GPT, ModelConfig
from .tokens import open_split, read_index
from .train import dist as tdist
from .train.config import TrainConfig
from .train.data import PackedRows, fixed_rows
from .train.evaluate import bits_per_byte, token_bytes, unigram_bpb
from .train.loop import LM, fit
from .weights import save_model


class ModelSpec(Config):
    """The depth dial and its overrides (null: derived from depth)."""

    depth: int = 4
    aspect_ratio: int = 64
    head_dim: int = 64
    kv_ratio: int = 1
    mlp_ratio: float = 8 / 3
    d_model: int | None = None
    n_head: int | None = None
    n_kv_head: int | None = None
    d_mlp: int | None = None
    max_seq_len: int | None = None   # null: train.seq_len
    rope_theta: float = 10000.0
    qk_norm: bool = False
    tie_embeddings: bool = False

    def build(self, vocab_size: int, seq_len: int) -> ModelConfig:
        overrides = {k: getattr(self, k) for k in ("d_model", "n_head", "n_kv_head", "d_mlp") if getattr(self, k) is not None}
        cfg = ModelConfig.from_depth(
            self.depth, vocab_size, aspect_ratio=self.aspect_ratio, head_dim=self.head_dim,
            kv_ratio=self.kv_ratio, mlp_ratio=self.mlp_ratio, max_seq_len=self.max_seq_len or seq_len,
            rope_theta=self.rope_theta, qk_norm=self.qk_norm, tie_embeddings=self.tie_embeddings, **overrides,
        )
        if cfg.max_seq_len < seq_len:
            raise ConfigError(f"params.yaml: pretrain.model.max_seq_len {cfg.max_seq_len} is below "
                              f"train.seq_len {seq_len} (fix: raise it or leave it null)")
        return cfg


class PretrainConfig(StageConfig):
    model: ModelSpec = ModelSpec()
    train: TrainConfig


def _model_config(cfg: PretrainConfig, vocab_size: int) -> ModelConfig:
    try:
        return cfg.model.build(vocab_size, cfg.train.seq_len)
    except ConfigError as e:
        raise ConfigError(f"params.yaml: pretrain.model: {e}") from None


def run(cfg: PretrainConfig, inputs: Mapping[str, str | Path], out_dir: str | Path,
        ctx: RunContext | None = None) -> dict[str, Any]:
    ctx = ctx or RunContext()
    tokens_dir, tokenizer_dir = Path(inputs["tokenizer/tokens"]), Path(inputs["tokenizer/tokenizer"])
    vocab = int(read_index(tokens_dir)["vocab_size"])
    mcfg = _model_config(cfg, vocab)
    tcfg = cfg.train
    dist = tdist.setup(tcfg.device)
    try:
        tcfg.check_processes(dist.world, "pretrain.train")
        train_split, val_split = open_split(tokens_dir, "train"), open_split(tokens_dir, "val")
        torch.manual_seed(tcfg.seed)
        model = GPT(mcfg)
        steps = tcfg.total_steps(mcfg.n_params())
        loader = PackedRows(train_split, tcfg.seq_len, seed=tcfg.seed, rank=dist.rank, world=dist.world)
        val_rows = fixed_rows(val_split, tcfg.seq_len, tcfg.eval_rows)
        tbytes = token_bytes(tokenizer_dir, vocab)
        result = fit(
            model, LM, loader, tcfg, dist=dist, total_steps=steps, d_model=mcfg.d_model,
            ckpt_dir=ctx.scratch / "ckpt",
            evaluate=lambda m: bits_per_byte(m, val_rows, tbytes, dist, micro_batch=tcfg.micro_batch),
            log=ctx.log_metrics, flops_per_token=mcfg.flops_per_token(tcfg.seq_len),
        )
        ctx.timings["tokens_per_s"] = result.tokens_per_s
        if result.mfu is not None:
            ctx.timings["mfu"] = result.mfu
        final = result.evals[result.steps]
        if dist.main:
            save_model(model.cpu(), Path(out_dir) / "model", tokenizer_dir=tokenizer_dir)
        return {
            "val_bpb": round(final["val_bpb"], 6),
            "val_loss": round(final["val_loss"], 6),
            "unigram_val_bpb": round(unigram_bpb(train_split.tokens, val_rows, tbytes), 6),
            "train_loss": round(result.train_loss, 6),
            "tokens_seen": result.tokens,
            "steps": result.steps,
            "n_params": mcfg.n_params(),
            "model": {k: getattr(mcfg, k) for k in ("n_layer", "d_model", "n_head", "n_kv_head", "d_mlp", "vocab_size")},
            "val_tokens": int(val_rows[:, 1:].size),
        }
    finally:
        tdist.teardown()
