"""Generation benchmark: greedy decoding with the KV cache against recomputing every step.

    .venv/bin/python bench/generate.py                       # ~2-3 min on 2 CPU cores
    .venv/bin/python bench/generate.py --rounds 1 --batches 1  # quicker

Writes bench/results/generate.txt. Results are written, not asserted; the one hard check is
that both paths produce the same tokens.

One model in the class of the tiny profile (depth 4, vocab 2048, d_model 256, 4 heads of 64,
max_seq_len 512), random weights with noise on the output projections so greedy decoding does
not repeat one token. Each batch row is a random prompt of --prompt-len tokens (equal lengths,
so the no-cache path runs the whole batch at once too), then --new-tokens greedy tokens with
no stop token: `lmforge.engine.generate(..., use_cache=True)` (one prefill, then one token per
row per step) against `use_cache=False` (the whole sequence through the model at every step).
Best of --rounds, after a short warm-up; tokens/s counts new tokens over all rows.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

import torch  # noqa: E402

from lmforge.atomic import write_text  # noqa: E402
from lmforge.engine import generate  # noqa: E402
from lmforge.model import GPT, ModelConfig  # noqa: E402
from lmforge.tokenizer import BOS_ID  # noqa: E402


def bench_model(device: str) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig.from_depth(4, 2048, aspect_ratio=64, head_dim=64, max_seq_len=512)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "lm_head.weight")):
                p.normal_(std=p.shape[1] ** -0.5)
    return model.to(device).eval()


def timed(model: GPT, prompts: list[list[int]], new_tokens: int, use_cache: bool,
          rounds: int) -> tuple[float, list[list[int]]]:
    """Best wall seconds of `rounds` greedy generations, and the tokens."""
    generate(model, prompts, 8, temperature=0, use_cache=use_cache)  # warm-up
    best, out = float("inf"), []
    for _ in range(rounds):
        if model.lm_head.weight.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = generate(model, prompts, new_tokens, temperature=0, use_cache=use_cache)
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--prompt-len", type=int, default=16, help="prompt tokens per row, <|bos|> included")
    ap.add_argument("--batches", default="1,8", help="comma-separated batch sizes (default: %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="timed runs per case (best is kept)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "generate.txt")
    args = ap.parse_args()

    model = bench_model(args.device)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [[BOS_ID, *torch.randint(7, cfg.vocab_size, (args.prompt_len - 1,), generator=gen).tolist()]
                   for _ in range(batch)]
        cached_s, cached = timed(model, prompts, args.new_tokens, True, args.rounds)
        plain_s, plain = timed(model, prompts, args.new_tokens, False, args.rounds)
        if cached != plain:
            sys.exit(f"batch {batch}: the cached and uncached paths disagree: a bug")
        n = batch * args.new_tokens
        rows.append((batch, n / plain_s, n / cached_s, plain_s / cached_s, plain_s, cached_s))
        print(f"batch {batch}: no cache {n / plain_s:8.1f} tok/s, KV cache {n / cached_s:8.1f} tok/s, "
              f"{plain_s / cached_s:.2f}x")

    threads = torch.get_num_threads()
    lines = [
        "# Generation benchmark: KV cache against recomputing the sequence",
        "",
        f"Model: depth {cfg.n_layer}, vocab {cfg.vocab_size}, d_model {cfg.d_model}, {cfg.n_head} heads of "
        f"{cfg.head_dim}, d_mlp {cfg.d_mlp}, {cfg.n_params() / 1e6:.2f}M parameters, float32, random weights.",
        f"Greedy, {args.prompt_len}-token prompts, {args.new_tokens} new tokens per row, no stop token; best of "
        f"{args.rounds} after a warm-up. Both paths gave identical tokens.",
        f"Device {args.device}; torch {torch.__version__} ({threads} threads); python {platform.python_version()}; "
        f"{platform.machine()}, {os.cpu_count()} CPUs visible; load average at end "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())}.",
        "",
        "| batch | no cache tok/s | KV cache tok/s | speedup | no cache s | KV cache s |",
        "|---:|---:|---:|---:|---:|---:|",
        *(f"| {b} | {p:.1f} | {c:.1f} | {r:.2f}x | {ps:.3f} | {cs:.3f} |" for b, p, c, r, ps, cs in rows),
        "",
        "tok/s counts new tokens over all rows. The no-cache path runs the whole sequence (prompt +",
        "tokens so far) through the model every step; the cache path runs one prefill, then one token",
        "per row per step. Regenerate: `.venv/bin/python bench/generate.py`.",
    ]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
