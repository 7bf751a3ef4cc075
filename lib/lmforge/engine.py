"""Text generation: batched sampling from a GPT with the KV cache.

    from lmforge.engine import generate, complete
    from lmforge.tokenizer import load_encoder
    from lmforge.weights import load_model, tokenizer_path
    model, _ = load_model("data/pretrain/model")
    enc = load_encoder(tokenizer_path("data/pretrain/model"))
    generate(model, [[0, 17, 42], [0, 5]], 32, temperature=0.8, top_k=50, seed=1)  # new ids per prompt
    complete(model, enc, "Once upon a time", 64, temperature=0)                    # greedy, a str

`generate` left-pads prompts of different lengths into one batch (`KVCache.pad`), runs one
prefill and then one forward of a single token per step. Each row ends at its first stop
token (not returned) or after `max_new_tokens`. Temperature 0 is greedy; otherwise
`top_k` / `top_p` (nucleus) filter the distribution and a `torch.Generator` seeded from
`seed` draws, so a seed gives the same tokens every run. `use_cache=False` recomputes the
whole sequence every step with no cache and no padding (prompts of equal length share a
batch): the reference the tests and bench/generate.py compare the cache against.

`lmforge generate --model DIR --prompt TEXT` is `cli_generate`. A prompt is encoded as a
document starts in the token shards, `[<|bos|>] + encode_ordinary(text)`; sampling stops by
default at `<|bos|>` (a new document) and `<|assistant_end|>`.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Literal, overload

import tiktoken
import torch

from .errors import LmforgeError
from .model import GPT, KVCache
from .tokenizer import BOS_ID, special_id

DEFAULT_STOPS = (BOS_ID, special_id("assistant_end"))

Step = Callable[[torch.Tensor], torch.Tensor]  # the last sampled tokens (B,) -> next logits (B, V)


class GenerationError(LmforgeError, ValueError):
    """Generation arguments that cannot work (an empty prompt, a context that does not fit, ...)."""


def _check(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float,
           top_k: int | None, top_p: float | None, vocab_size: int | None) -> None:
    cfg = model.config
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token (start it with <|bos|>)")
    bad = [t for p in prompts for t in p if not 0 <= t < cfg.vocab_size]
    if bad:
        raise GenerationError(f"token id {bad[0]} is outside the model's vocabulary of {cfg.vocab_size}")
    if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1) \
            or (top_p is not None and not 0 < top_p <= 1) or (vocab_size is not None and vocab_size < 1):
        raise GenerationError(f"need max_new_tokens >= 0, temperature >= 0, top_k >= 1, 0 < top_p <= 1, "
                              f"vocab_size >= 1 (got {max_new_tokens}, {temperature}, {top_k}, {top_p}, "
                              f"{vocab_size})")
    longest = max(len(p) for p in prompts)
    if longest + max_new_tokens > cfg.max_seq_len:
        raise GenerationError(f"a prompt of {longest} tokens + {max_new_tokens} new tokens = "
                              f"{longest + max_new_tokens} exceeds the model's max_seq_len {cfg.max_seq_len}; "
                              f"shorten the prompt or lower max_new_tokens")


def sample(logits: torch.Tensor, *, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of `logits` (B, V): argmax at temperature 0, else a draw."""
    logits = logits.float()
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(-1)
        # drop a token when the more likely ones already hold top_p of the mass (the first stays)
        ordered = ordered.masked_fill(probs.cumsum(-1) - probs >= top_p, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, ordered)
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def _cached(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int) -> tuple[torch.Tensor, Step]:
    """Prefill a left-padded batch into a fresh cache; each step feeds one token per row."""
    device, dtype = model.lm_head.weight.device, model.lm_head.weight.dtype
    width = max(len(p) for p in prompts)
    pad = torch.tensor([width - len(p) for p in prompts], device=device)
    idx = torch.tensor([[BOS_ID] * (width - len(p)) + list(p) for p in prompts], device=device)
    cache = KVCache.empty(model.config, len(prompts), width + max_new_tokens, device=device, dtype=dtype, pad=pad)
    first = model(idx, cache=cache)[:, -1]
    return first, lambda tokens: model(tokens[:, None], cache=cache)[:, -1]


def _uncached(model: GPT, prompts: Sequence[Sequence[int]]) -> tuple[torch.Tensor, Step]:
    """No cache: every step runs the whole sequence again; prompts of one length form one batch."""
    device = model.lm_head.weight.device
    by_len: dict[int, list[int]] = {}
    for row, p in enumerate(prompts):
        by_len.setdefault(len(p), []).append(row)
    groups = [(torch.tensor(rows, device=device), torch.tensor([list(prompts[r]) for r in rows], device=device))
              for rows in by_len.values()]

    def logits() -> torch.Tensor:
        out = torch.empty(len(prompts), model.config.vocab_size, device=device)
        for rows, seq in groups:
            out[rows] = model(seq)[:, -1].float()
        return out

    def step(tokens: torch.Tensor) -> torch.Tensor:
        groups[:] = [(rows, torch.cat([seq, tokens[rows, None]], dim=1)) for rows, seq in groups]
        return logits()

    return logits(), step


def generate(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
             top_k: int | None = None, top_p: float | None = None, stop_tokens: Iterable[int] = (),
             seed: int | None = None, use_cache: bool = True, vocab_size: int | None = None) -> list[list[int]]:
    """The new tokens of each prompt (lists of ids), stopping at a stop token or max_new_tokens.

    `vocab_size` restricts sampling to ids below it (a model's vocabulary may be larger than
    its tokenizer's). The model is put in eval mode; nothing is recorded for autograd.
    """
    out: list[list[int]] = [[] for _ in prompts]
    for row, token in steps(model, prompts, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            stop_tokens=stop_tokens, seed=seed, use_cache=use_cache, vocab_size=vocab_size):
        out[row].append(token)
    return out


@overload
def steps(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = ...,
          top_k: int | None = ..., top_p: float | None = ..., stop_tokens: Iterable[int] = ...,
          seed: int | None = ..., use_cache: bool = ..., vocab_size: int | None = ...,
          logprobs: Literal[False] = ...) -> Iterator[tuple[int, int]]: ...
@overload
def steps(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = ...,
          top_k: int | None = ..., top_p: float | None = ..., stop_tokens: Iterable[int] = ...,
          seed: int | None = ..., use_cache: bool = ..., vocab_size: int | None = ...,
          logprobs: Literal[True]) -> Iterator[tuple[int, int, float]]: ...
def steps(model: GPT, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, temperature: float = 1.0,
          top_k: int | None = None, top_p: float | None = None, stop_tokens: Iterable[int] = (),
          seed: int | None = None, use_cache: bool = True, vocab_size: int | None = None,
          logprobs: bool = False) -> Iterator[tuple[int, int]] | Iterator[tuple[int, int, float]]:
    """`generate` as a stream: (row, token) for each new token as it is sampled, step by step
    (rows in order within a step). Each step runs under inference mode, none across a yield.

    With `logprobs`, (row, token, logprob): the token's log-probability under the model's own
    distribution, the log-softmax of the raw logits over the whole vocabulary, before
    `vocab_size`, temperature, top-k or top-p shape the draw (the same at any temperature)."""
    _check(model, prompts, max_new_tokens, temperature, top_k, top_p, vocab_size)
    if max_new_tokens == 0:
        return
    model.eval()
    stops, done = set(stop_tokens), [False] * len(prompts)
    generator = torch.Generator(device=model.lm_head.weight.device)
    if seed is None:
        generator.seed()
    else:
        generator.manual_seed(seed)
    with torch.inference_mode():
        logits, step = _cached(model, prompts, max_new_tokens) if use_cache else _uncached(model, prompts)
    for i in range(max_new_tokens):
        with torch.inference_mode():
            scores = logits.float().log_softmax(-1) if logprobs else None  # before the cut below
            if vocab_size is not None:
                logits[:, vocab_size:] = float("-inf")
            tokens = sample(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
            picked = scores.gather(-1, tokens[:, None])[:, 0].tolist() if scores is not None else None
        for row, token in enumerate(tokens.tolist()):
            if done[row]:
                continue
            if token in stops:
                done[row] = True
            elif picked is None:
                yield row, token
            else:
                yield row, token, picked[row]
        if all(done) or i == max_new_tokens - 1:
            break
        with torch.inference_mode():
            logits = step(tokens)


def encode_prompt(encoder: tiktoken.Encoding, text: str) -> list[int]:
    """`[<|bos|>] + encode_ordinary(text)`: how a document starts in the token shards."""
    return [BOS_ID, *encoder.encode_ordinary(text)]


def complete(model: GPT, encoder: tiktoken.Encoding, text: str, max_new_tokens: int = 64, *,
             stop_tokens: Iterable[int] = DEFAULT_STOPS, **kwargs: object) -> str:
    """The continuation of `text` as a string; `kwargs` (temperature, top_k, seed, ...) go to `generate`."""
    [row] = generate(model, [encode_prompt(encoder, text)], max_new_tokens, stop_tokens=stop_tokens,
                     vocab_size=encoder.n_vocab, **kwargs)  # type: ignore[arg-type]
    return encoder.decode(row)


def add_sampling_args(p: argparse.ArgumentParser, *, temperature: float, top_k: int | None) -> None:
    """The sampling options `lmforge generate` and `lmforge chat` share."""
    p.add_argument("--temperature", type=float, default=temperature, help="0 for greedy (default: %(default)s)")
    p.add_argument("--top-k", type=int, default=top_k, help="sample among the k most likely tokens (default: %(default)s)")
    p.add_argument("--top-p", type=float, default=None, help="sample among the tokens holding this much mass")
    p.add_argument("--seed", type=int, default=None, help="sampling seed, for reproducible samples")
    p.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")


def cli_generate(args: argparse.Namespace) -> int:
    """`lmforge generate`: print continuations of a prompt from a model directory."""
    from .export.hf import load_any

    if args.num_samples < 1:
        raise GenerationError(f"--num-samples must be >= 1 (got {args.num_samples})")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, encoder, _ = load_any(args.model, device=device)  # our model directory or an HF export
    rows = generate(model, [encode_prompt(encoder, args.prompt)] * args.num_samples, args.max_new_tokens,
                    temperature=0.0 if args.greedy else args.temperature, top_k=args.top_k, top_p=args.top_p,
                    stop_tokens=DEFAULT_STOPS, seed=args.seed, vocab_size=encoder.n_vocab)
    texts = [encoder.decode(row) for row in rows]
    for i, text in enumerate(texts):
        if len(texts) > 1:
            print(f"--- sample {i + 1} ---")
        print(text)
    return 0
