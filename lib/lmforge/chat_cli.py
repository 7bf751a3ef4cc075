"""`lmforge chat --model DIR`: a streaming terminal chat over any model directory whose tokenizer
carries a chat template (data/sft/model, data/rl/model, ...) or a Hugging Face export of one
(data/export/hf).

Each line you type is a user turn; the reply streams as it is sampled, rendered with the same
chat format as training (lmforge.chat). `/reset` starts over, `/exit` or end of input leaves.
When the conversation outgrows the context, the oldest turns are dropped (the system turn stays).
Reads stdin, so `printf 'What is 2 + 3?\\n' | lmforge chat --model data/sft/model --seed 0` works
in scripts.
"""

from __future__ import annotations

import argparse
import codecs
import json
import sys
from pathlib import Path
from typing import TextIO

import tiktoken
import torch

from .chat import Turns, prompt_ids
from .engine import DEFAULT_STOPS, GenerationError, add_sampling_args, steps
from .errors import InputError
from .export.hf import load_any
from .model import GPT
from .tokenizer import CONFIG_FILE
from .weights import TOKENIZER_DIR


def load_chat_model(model_dir: str | Path, device: str | None = None) -> tuple[GPT, tiktoken.Encoding]:
    """A model and encoder to chat with, from one of our model directories or a Hugging Face
    export (lmforge.export.hf.load_any); refused when its tokenizer has no chat template."""
    root = Path(model_dir)
    tok_dir = root / TOKENIZER_DIR if (root / TOKENIZER_DIR).is_dir() else root
    path = tok_dir / CONFIG_FILE
    try:
        template = json.loads(path.read_text(encoding="utf-8")).get("chat_template")
    except (OSError, ValueError) as e:
        raise InputError(path, f"cannot read the tokenizer config ({e})",
                         fix="point --model at a model directory or an export (data/export/hf)") from None
    if not template:
        raise InputError(path, "the tokenizer has no chat template, so the model was not trained to chat",
                         fix="use a chat model (data/sft/model or data/rl/model), or re-run the tokenizer stage")
    model, encoder, _ = load_any(root, device=device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return model, encoder


def fit_context(turns: Turns, render_len: int, max_seq_len: int, max_new_tokens: int) -> Turns:
    """Drop the oldest user/assistant exchanges until the prompt leaves room for the reply."""
    if render_len + max_new_tokens <= max_seq_len:
        return turns
    system = [t for t in turns[:1] if t[0] == "system"]
    rest = turns[len(system):]
    return system + rest[2:] if len(rest) > 1 else turns


def chat(args: argparse.Namespace, stdin: TextIO = sys.stdin, stdout: TextIO = sys.stdout) -> int:
    model, enc = load_chat_model(args.model, args.device)
    interactive = stdin.isatty()
    turns: Turns = [("system", args.system)] if args.system else []
    seed = args.seed
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        line = stdin.readline()
        if not line or line.strip() == "/exit":
            return 0
        text = line.rstrip("\n")
        if text.strip() == "/reset":
            turns = turns[:1] if turns and turns[0][0] == "system" else []
            continue
        if not text.strip():
            continue
        turns.append(("user", text))
        while True:
            prompt = prompt_ids(enc, turns)
            shorter = fit_context(turns, len(prompt), model.config.max_seq_len, args.max_new_tokens)
            if shorter is turns:
                break
            turns = shorter
        if len(prompt) + args.max_new_tokens > model.config.max_seq_len:
            raise GenerationError(f"this message alone ({len(prompt)} tokens) and --max-new-tokens "
                                  f"{args.max_new_tokens} exceed the model's context of {model.config.max_seq_len}")
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        reply = []
        for _, token in steps(model, [prompt], args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, stop_tokens=DEFAULT_STOPS, seed=seed, vocab_size=enc.n_vocab):
            reply.append(token)
            stdout.write(decoder.decode(enc.decode_single_token_bytes(token)))
            stdout.flush()
        stdout.write(decoder.decode(b"", final=True) + "\n")
        stdout.flush()
        turns.append(("assistant", enc.decode(reply)))
        if seed is not None:
            seed += 1  # a new draw per reply, the same conversation every run


def add_parser(sub: argparse._SubParsersAction) -> None:
    c = sub.add_parser("chat", help="chat with a model in the terminal, the reply streaming as it is sampled")
    c.add_argument("--model", required=True, help="model directory with a chat template (data/rl/model) or an export (data/export/hf)")
    c.add_argument("--system", default=None, help="a system turn to start every conversation with")
    c.add_argument("--max-new-tokens", type=int, default=256, help="most tokens per reply (default: %(default)s)")
    add_sampling_args(c, temperature=0.7, top_k=50)
    c.set_defaults(func=lambda args: chat(args))
