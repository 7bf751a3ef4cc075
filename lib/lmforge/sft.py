"""The `sft` stage: chat supervised fine-tuning of the governed model in the one training loop.

Conversations come from `sft.data.sets` (lmforge.data.chats: templated chats over generated
math, one-step drills, users' jsonl and Hugging Face datasets), are split by prompt hash into
train and held-out, and written to `data/sft/conversations.parquet` (the rl stage reads its
prompts and held-out problems from it). Held-out prompts that the model already saw as
"Question: ... Answer: ..." documents in the mix's train split are dropped, so held-out means
never seen in any earlier stage.

Training is the LM objective on packed conversations whose targets are the assistant's tokens
only (lmforge.chat.render's mask); with `data.pretrain_fraction`, that share of every batch is
pretraining text instead (lmforge.train.data.Blend), which keeps what the base model knew (the
forgetting stage's retention table measures it). Metrics, before (the govern model) and after:
`heldout_loss_*` (mean assistant-token loss on held-out conversations) and
`heldout_accuracy_*` (greedy exact match of the final `#### N` on held-out math problems).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import pandas as pd
import tiktoken
import torch
from pydantic import field_validator

from .atomic import write_bytes
from .chat import prompt_ids, qa_turns, render
from .config import Config, StageConfig, non_empty
from .context import RunContext
from .data import mathgen
from .data.chats import ChatSet, Conversation, assert_disjoint, build, from_table, table
from .engine import DEFAULT_STOPS, generate
from .errors import ConfigError
from .model import GPT
from .tokenizer import BOS_ID, load_encoder
from .tokens import TokenSplit, iter_docs, open_split, split_files
from .train import dist as tdist
from .train.config import TrainConfig
from .train.data import Blend, PackedRows
from .train.dist import Dist, all_sum
from .train.loop import LM, fit
from .weights import load_model, save_model


class SFTData(Config):
    seed: int = 7
    sets: Annotated[list[ChatSet], non_empty("conversation set")]
    heldout_fraction: float = 0.1   # share of prompts (by hash) held out
    # Share of every batch that is pretraining text (the tokenizer stage's train tokens, every
    # token a target) instead of conversations: the base model's skill is kept, not overwritten.
    pretrain_fraction: float = 0.0

    @field_validator("heldout_fraction")
    @classmethod
    def _fraction(cls, v: float) -> float:
        if not 0.0 < v < 1.0:
            raise ValueError(f"must be between 0 and 1, exclusive (got {v})")
        return v

    @field_validator("pretrain_fraction")
    @classmethod
    def _pretrain(cls, v: float) -> float:
        if not 0.0 <= v < 1.0:
            raise ValueError(f"must be in [0, 1) (got {v})")
        return v


class SFTEval(Config):
    heldout_conversations: int = 256  # held-out conversations scored for assistant-token loss
    accuracy_n: int = 200             # held-out math problems graded by greedy exact match
    max_new_tokens: int = 64
    batch: int = 64                   # prompts per generation batch


class SFTConfig(StageConfig):
    data: SFTData
    eval: SFTEval = SFTEval()
    train: TrainConfig

    def input_paths(self) -> list[str]:
        """Local files and directories the sets read (the wrapper checks they are declared deps)."""
        return [str(s.path) for s in self.data.sets
                if s.path and (s.kind == "jsonl" or Path(str(s.path)).exists())]


# --- data ---------------------------------------------------------------------------------------

def seen_prompts(mix_train: Path) -> set[str]:
    """Prompt keys of the mix's Question/Answer documents: what pretraining and govern saw."""
    from .data.chats import prompt_key

    keys = set()
    for path in split_files(mix_train.parent, "train"):
        for docs in iter_docs([path]):
            for text in docs.texts:
                if (turns := qa_turns(text)) is not None:
                    keys.add(prompt_key(turns))
    return keys


def conversations(cfg: SFTData, mix_train: Path) -> tuple[pd.DataFrame, dict[str, int]]:
    """The conversation table (deduplicated by prompt, held-out prompts unseen upstream) and counts."""
    convs = build(cfg.sets, cfg.seed)
    df = table(convs, cfg.heldout_fraction)
    n_built = len(df)
    df = df.drop_duplicates("prompt_sha256", keep="first")
    seen = seen_prompts(mix_train)
    leaked = (df["split"] == "heldout") & df["prompt_sha256"].isin(seen)
    df = df[~leaked].reset_index(drop=True)
    held = df[df["split"] == "heldout"]
    assert_disjoint(from_table(df[df["split"] == "train"]), from_table(held))
    return df, {"built": n_built, "duplicates_dropped": n_built - int(leaked.sum()) - len(df),
                "heldout_seen_upstream_dropped": int(leaked.sum()),
                "train": int((df["split"] == "train").sum()), "heldout": len(held)}


def chat_split(enc: tiktoken.Encoding, convs: Sequence[Conversation]) -> tuple[TokenSplit, np.ndarray]:
    """Conversations rendered back to back (each BOS-first) as a split, and the loss mask."""
    ids, masks = zip(*(render(enc, c.turns, mask=True) for c in convs), strict=True)
    lengths = np.array([len(x) for x in ids], dtype=np.int64)
    tokens = np.concatenate(ids)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    index = {"n_docs": len(ids), "n_tokens": len(tokens)}
    return TokenSplit(tokens=tokens, offsets=offsets, index=index, bos_id=BOS_ID), np.concatenate(masks)


# --- evaluation --------------------------------------------------------------------------------

@torch.no_grad()
def assistant_loss(model: GPT, enc: tiktoken.Encoding, convs: Sequence[Conversation], dist: Dist, *,
                   seq_len: int, micro_batch: int) -> float:
    """Mean loss (nats) over the assistant tokens of `convs`, one conversation per row."""
    per = -(-len(convs) // dist.world)
    mine = convs[dist.rank * per:(dist.rank + 1) * per]
    total = count = 0.0
    was = model.training
    model.eval()
    for i in range(0, len(mine), micro_batch):
        rows = [render(enc, c.turns, mask=True) for c in mine[i:i + micro_batch]]
        width = min(seq_len + 1, max(len(ids) for ids, _ in rows))
        x = torch.zeros((len(rows), width), dtype=torch.long)
        y = torch.full((len(rows), width), -1, dtype=torch.long)
        for r, (ids, keep) in enumerate(rows):
            ids, keep = ids[:width], keep[:width]
            x[r, :len(ids)] = torch.from_numpy(ids)
            y[r, :len(ids)] = torch.from_numpy(np.where(keep, ids, -1))
        y = y[:, 1:].to(dist.device)
        n = int((y != -1).sum())
        if n:
            total += float(model(x[:, :-1].to(dist.device), y)) * n
            count += n
    model.train(was)
    total, count = all_sum([total, count], dist)
    return total / max(count, 1.0)


def answers(model: GPT, enc: tiktoken.Encoding, problems: Sequence[Conversation], *,
            max_new_tokens: int, batch: int, temperature: float = 0.0, seed: int = 0,
            samples: int = 1) -> list[list[str]]:
    """`samples` replies per problem (greedy at temperature 0), from its conversation minus
    the final assistant turn."""
    prompts = [prompt_ids(enc, c.turns[:-1]) for c in problems for _ in range(samples)]
    out: list[str] = []
    was = model.training
    for i in range(0, len(prompts), batch):
        rows = generate(model, prompts[i:i + batch], max_new_tokens, temperature=temperature,
                        stop_tokens=DEFAULT_STOPS, seed=seed + i, vocab_size=enc.n_vocab)
        out += [enc.decode(r) for r in rows]
    model.train(was)
    return [out[j * samples:(j + 1) * samples] for j in range(len(problems))]


def exact_match(replies: Sequence[Sequence[str]], problems: Sequence[Conversation]) -> list[list[bool]]:
    return [[mathgen.extract_answer(r) == p.answer for r in rs] for rs, p in zip(replies, problems, strict=True)]


def heldout(df: pd.DataFrame, n: int, *, graded: bool) -> list[Conversation]:
    """The first `n` held-out conversations in prompt-hash order (a seed-free shuffle);
    `graded`: only those with an exact answer."""
    rows = df[df["split"] == "heldout"]
    if graded:
        rows = rows[rows["answer"].notna()]
    return from_table(rows.sort_values("prompt_sha256").head(n))


def evaluate(model: GPT, enc: tiktoken.Encoding, df: pd.DataFrame, cfg: SFTConfig, dist: Dist) -> dict[str, Any]:
    convs = heldout(df, cfg.eval.heldout_conversations, graded=False)
    problems = heldout(df, cfg.eval.accuracy_n, graded=True)
    def loss(cs: Sequence[Conversation]) -> float:
        return assistant_loss(model, enc, cs, dist, seq_len=cfg.train.seq_len, micro_batch=cfg.train.micro_batch)

    right = exact_match(answers(model, enc, problems, max_new_tokens=cfg.eval.max_new_tokens,
                                batch=cfg.eval.batch), problems)
    by_source = {src: round(loss([c for c in convs if c.source == src]), 6) for src in sorted({c.source for c in convs})}
    return {"heldout_loss": loss(convs), "heldout_loss_by_source": by_source,  # type: ignore[dict-item]
            "heldout_accuracy": float(np.mean([r[0] for r in right])) if right else 0.0}


# --- the stage ----------------------------------------------------------------------------------

def run(cfg: SFTConfig, inputs: Mapping[str, str | Path], out_dir: str | Path,
        ctx: RunContext | None = None) -> dict[str, Any]:
    ctx = ctx or RunContext()
    out = Path(out_dir)
    tokenizer_dir = Path(inputs["tokenizer/tokenizer"])
    dist = tdist.setup(cfg.train.device)
    try:
        cfg.train.check_processes(dist.world, "sft.train")
        enc = load_encoder(tokenizer_dir)
        df, counts = conversations(cfg.data, Path(inputs["mix/train"]))
        train = from_table(df[df["split"] == "train"])
        if not train:
            raise ConfigError("params.yaml: sft.data: no training conversations (fix: add sets or raise n)")
        split, mask = chat_split(enc, train)
        model, _ = load_model(inputs["govern/model"], device=dist.device)
        before = evaluate(model, enc, df, cfg, dist)
        tcfg = cfg.train
        torch.manual_seed(tcfg.seed)
        chats = PackedRows(split, tcfg.seq_len, seed=tcfg.seed, rank=dist.rank, world=dist.world, mask=mask)
        loader: PackedRows | Blend = chats
        if cfg.data.pretrain_fraction > 0:
            text = PackedRows(open_split(inputs["tokenizer/tokens"], "train"), tcfg.seq_len, seed=tcfg.seed)
            loader = Blend(chats, text, cfg.data.pretrain_fraction, seed=tcfg.seed, rank=dist.rank, world=dist.world)
        result = fit(model, LM, loader, tcfg, dist=dist, total_steps=tcfg.total_steps(model.config.n_params()),
                     d_model=model.config.d_model, ckpt_dir=ctx.scratch / "ckpt", log=ctx.log_metrics,
                     evaluate=lambda m: {"heldout_loss": assistant_loss(
                         m, enc, heldout(df, cfg.eval.heldout_conversations, graded=False), dist,
                         seq_len=tcfg.seq_len, micro_batch=tcfg.micro_batch)})
        after = evaluate(model, enc, df, cfg, dist)
        if dist.main:
            save_model(model.cpu(), out / "model", tokenizer_dir=tokenizer_dir)
            buf = df.to_parquet(index=False, compression="zstd")
            write_bytes(out / "conversations.parquet", buf)
        return {
            "heldout_loss_before": round(before["heldout_loss"], 6),
            "heldout_loss_after": round(after["heldout_loss"], 6),
            "heldout_loss_by_source_before": before["heldout_loss_by_source"],
            "heldout_loss_by_source_after": after["heldout_loss_by_source"],
            "heldout_accuracy_before": round(before["heldout_accuracy"], 6),
            "heldout_accuracy_after": round(after["heldout_accuracy"], 6),
            "heldout_accuracy_n": len(heldout(df, cfg.eval.accuracy_n, graded=True)),
            "train_loss": round(result.train_loss, 6),
            "steps": result.steps,
            "tokens_seen": result.tokens,
            "train_tokens_trained": int(mask.sum()),
            "conversations": counts,
        }
    finally:
        tdist.teardown()
