"""GGUF export against llama.cpp: the same greedy tokens and the same tokenization as ours?

    PYTHONPATH=lib:. .venv/bin/python bench/gguf_llamacpp.py                  # data/rl/model, ~15 s
    PYTHONPATH=lib:. .venv/bin/python bench/gguf_llamacpp.py --model DIR --llama-python /path/bin/python

Writes GGUF files (f32 and q8_0 by default) of a model directory with
`lmforge.export.gguf.write_gguf` into a temporary directory, then runs llama.cpp through
llama-cpp-python in a subprocess of another interpreter (`--llama-python`, default
/tmp/llvenv/bin/python; llama-cpp-python is not a dependency of lmforge):

- greedy decoding of --new-tokens tokens from each fixed prompt, fed as token ids (<|bos|> +
  our encoding of the text; a chat prompt rendered by lmforge.chat.prompt_ids), no stop token,
  `Llama.generate(temp=0, top_k=1)` after a reset, one prompt at a time; compared with
  `lmforge.engine.generate(model, [ids], n, temperature=0.0)`. Where they differ, the first
  differing step and our top-2 logit gap there are reported (a near tie is float noise, a
  wide gap a bug).
- tokenization: llama.cpp's `tokenize(text, add_bos=False, special=False)` of the prompts' text,
  of the start of each source corpus in data/sources, and of the text of every vocabulary entry
  (a word that is one token: where llama.cpp, which has no ignore_merges for the "qwen2"
  pre-tokenizer, would differ), against tiktoken's `encode_ordinary`; and the chat prompt's
  rendered template text with `special=True` against `prompt_ids`.
- our own read-back (`lmforge.export.gguf.compare`) for each file; with f32 and q8_0, llama.cpp's
  own quantizer (`llama_model_quantize`) run on our f32 file, its tensors compared with ours.
- two random models in the layouts the trained one lacks (GQA; `qwen3` with QK-norm and a tied
  head), f32, greedy tokens only (--no-random skips them).

A llama.cpp run killed by a signal is run again with `use_extra_bufts = False` (its `--no-repack`),
and the report says so: llama.cpp's AMX Q8_0 kernel crashes on some CPUs with AMX.

Prints a table and writes bench/results/gguf_llamacpp.md. Results are written, not asserted.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

import gguf  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from lmforge.atomic import write_text  # noqa: E402
from lmforge.chat import prompt_ids  # noqa: E402
from lmforge.engine import generate  # noqa: E402
from lmforge.export.gguf import PRE_TOKENIZER, compare, write_gguf  # noqa: E402
from lmforge.model import GPT, ModelConfig  # noqa: E402
from lmforge.tokenizer import BOS_ID, load_encoder  # noqa: E402
from lmforge.weights import load_model, tokenizer_path  # noqa: E402

TEXT_PROMPTS = [
    "Call me Ishmael. Some years ago",
    "In the beginning God created",
    "Question: What is 7854 + 296?\nAnswer:",
    "def fibonacci(n):\n    ",
    "To be, or not to be, that is",
    "Mr. Speaker, the state of our Union is",
]
CHAT_PROMPT = "What is 12 + 30?"
SOURCE_CHARS = 3000

# Runs under --llama-python: argv[1] the job (JSON), argv[2] where to write the result (JSON).
RUNNER = r'''
import json, sys, time
import llama_cpp
from llama_cpp import Llama

job = json.load(open(sys.argv[1]))
if job.get("quantize"):  # llama.cpp's own quantizer (llama-quantize): f32 GGUF -> Q8_0 GGUF
    import ctypes
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q8_0
    params.nthread = job["threads"]
    rc = llama_cpp.llama_model_quantize(job["src"].encode(), job["dst"].encode(), ctypes.byref(params))
    json.dump({"rc": rc}, open(sys.argv[2], "w"))
    sys.exit(0)
if not job["extra_bufts"]:  # Llama() has no argument for it; its model params come from this function
    _default = llama_cpp.llama_cpp.llama_model_default_params

    def _no_extra_bufts():
        params = _default()
        params.use_extra_bufts = False
        return params
    llama_cpp.llama_cpp.llama_model_default_params = _no_extra_bufts
res = {"llama_cpp_python": llama_cpp.__version__, "llama_cpp": llama_cpp.llama_cpp.llama_version().decode(),
       "system_info": llama_cpp.llama_print_system_info().decode().strip()}
start = time.perf_counter()
llm = Llama(model_path=job["model_path"], n_ctx=job["n_ctx"], logits_all=False, verbose=False,
            n_threads=job["threads"], seed=0)
res["load_s"] = time.perf_counter() - start
res["n_vocab"] = llm.n_vocab()
res["metadata"] = {k: v for k, v in llm.metadata.items() if not k.startswith("tokenizer.ggml.")
                   and k != "tokenizer.chat_template"}
start = time.perf_counter()
out = []
for ids in job["prompts"]:
    llm.reset()
    got = []
    for token in llm.generate(ids, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        got.append(int(token))
        if len(got) >= job["n_new"]:
            break
    out.append(got)
res["decode_s"] = time.perf_counter() - start
res["tokens"] = out
res["tokenize"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=False) for t in job["texts"]]
res["tokenize_special"] = [llm.tokenize(t.encode("utf-8"), add_bos=False, special=True) for t in job["special_texts"]]
json.dump(res, open(sys.argv[2], "w"))
'''


def build_time() -> str:
    """The `real` line of `time pip install llama-cpp-python` in /tmp/llbuild.time."""
    try:
        text = Path("/tmp/llbuild.time").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"^real\s+(\S+)", text, re.M)
    return m.group(1) if m else "unknown"


def source_texts() -> dict[str, str]:
    """The first SOURCE_CHARS characters of each source corpus's first document."""
    out = {}
    for path in sorted((REPO / "data" / "sources").glob("*.jsonl.gz")):
        with gzip.open(path, "rt", encoding="utf-8") as f:
            line = f.readline()
        text = json.loads(line).get("text") if line else None
        if isinstance(text, str):  # facts.jsonl.gz holds records, not text
            out[path.name.removesuffix(".jsonl.gz")] = text[:SOURCE_CHARS]
    return out


def vocab_texts(enc: Any, n_vocab: int) -> list[str]:
    """The text of every ordinary vocabulary entry that is valid UTF-8 on its own."""
    out = []
    for i in range(n_vocab):
        try:
            raw = enc.decode_single_token_bytes(i)
        except KeyError:
            continue
        if i in enc._special_tokens.values():  # noqa: SLF001
            continue
        try:
            out.append(raw.decode("utf-8"))
        except UnicodeDecodeError:
            continue
    return out


def run_llama(python: str, tmp: Path, job: dict[str, Any]) -> subprocess.CompletedProcess[str]:
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "runner.py").write_text(RUNNER)
    (tmp / "res.json").unlink(missing_ok=True)
    return subprocess.run([python, str(tmp / "runner.py"), str(tmp / "job.json"), str(tmp / "res.json")],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})


def quantize_check(args: argparse.Namespace, tmp: Path, job: dict[str, Any]) -> dict[str, Any]:
    """Quantize our f32 file with llama.cpp's own quantizer; compare its tensors with our q8_0 file's
    and decode with it (default settings first, as for ours)."""
    src, dst = tmp / "model-f32.gguf", tmp / "model-llama-quantize-q8_0.gguf"
    proc = run_llama(args.llama_python, tmp, {"quantize": True, "src": str(src), "dst": str(dst), "threads": args.threads})
    if proc.returncode or json.loads((tmp / "res.json").read_text())["rc"] != 0:
        sys.exit(f"llama_model_quantize failed:\n{proc.stderr[-4000:]}")
    theirs = {t.name: (t.tensor_type, np.array(t.data)) for t in gguf.GGUFReader(dst).tensors}
    ours = {t.name: (t.tensor_type, np.array(t.data)) for t in gguf.GGUFReader(tmp / "model-q8_0.gguf").tensors}
    same = sum(n in theirs and theirs[n][0] == t and np.array_equal(theirs[n][1], d) for n, (t, d) in ours.items())
    crashed = None
    for extra_bufts in (True, False):
        proc = run_llama(args.llama_python, tmp, {**job, "model_path": str(dst), "extra_bufts": extra_bufts})
        if proc.returncode >= 0 or not extra_bufts:
            break
        crashed = f"signal {-proc.returncode} with the extra buffer types"
    if proc.returncode:
        sys.exit(f"llama.cpp run failed (llama-quantize q8_0, rc {proc.returncode}):\n{proc.stderr[-4000:]}")
    tokens = json.loads((tmp / "res.json").read_text())["tokens"]
    return {"n": len(ours), "same": same, "crashed": crashed, "tokens": tokens}


def first_diff(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y),
                None if len(a) == len(b) else min(len(a), len(b)))


@torch.no_grad()
def gap_at(model: GPT, ids: list[int], new: list[int], step: int) -> float:
    """Our top-1 minus top-2 logit before new token `step`."""
    logits = model(torch.tensor([ids + new[:step]]))[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def random_model(vocab: int, *, qk_norm: bool, tie: bool) -> GPT:
    """A random model in a layout the trained one does not have: GQA (4 query heads, 2 KV heads,
    so k is permuted with its own head count), rope_theta 5e5, eps 1e-5, every matrix
    N(0, 1/fan_in) and norms away from 1 (a misplaced norm or permutation would show)."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=vocab, n_layer=2, d_model=256, n_head=4, n_kv_head=2, head_dim=64, d_mlp=512,
                            max_seq_len=256, rope_theta=500000.0, norm_eps=1e-5, qk_norm=qk_norm, tie_embeddings=tie))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and not (tie and "embed_tokens" in name):
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model.eval()


def check_model(args: argparse.Namespace, model: GPT, tok_dir: Path, prompts: list[list[int]], n_new: int,
                dtypes: list[str], texts: list[str], chat_text: str) -> dict[str, Any]:
    """Write each dtype, read it back ourselves, decode with llama.cpp; our tokens for reference."""
    start = time.perf_counter()
    ours = [generate(model, [p], n_new, temperature=0.0)[0] for p in prompts]
    out: dict[str, Any] = {"ours": ours, "ours_s": time.perf_counter() - start, "files": {}, "llq": None}
    with tempfile.TemporaryDirectory(prefix="gguf-llamacpp-") as tmp:
        for dtype in dtypes:
            path = Path(tmp) / f"model-{dtype}.gguf"
            start = time.perf_counter()
            summary = write_gguf(model, tok_dir, path, dtype=dtype)  # type: ignore[arg-type]
            write_s = time.perf_counter() - start
            readback = compare(model, path)
            job = {"model_path": str(path), "n_ctx": model.config.max_seq_len, "threads": args.threads,
                   "n_new": n_new, "prompts": prompts, "texts": texts, "special_texts": [chat_text]}
            crashed = None
            for extra_bufts in (True, False):
                proc = run_llama(args.llama_python, Path(tmp), {**job, "extra_bufts": extra_bufts})
                if proc.returncode >= 0 or not extra_bufts:
                    break
                # killed by a signal: llama.cpp's AMX Q8_0 kernel (an "extra buffer type") crashes on
                # some CPUs with AMX; run again on the plain CPU kernels and say so
                crashed = f"signal {-proc.returncode} with llama.cpp's extra buffer types (AMX/repack)"
            if proc.returncode:
                sys.exit(f"llama.cpp run failed ({dtype}, rc {proc.returncode}):\n{proc.stderr[-4000:]}")
            res = json.loads((Path(tmp) / "res.json").read_text())
            res.update(summary=summary, write_s=write_s, readback=readback, crashed=crashed)
            res["same"] = [first_diff(got, want) for got, want in zip(res["tokens"], ours, strict=True)]
            out["files"][dtype] = res
        if {"f32", "q8_0"} <= set(dtypes):
            llq = quantize_check(args, Path(tmp), job)
            llq["same_tokens"] = sum(a == b for a, b in zip(llq.pop("tokens"), out["files"]["q8_0"]["tokens"],
                                                            strict=True))
            out["llq"] = llq
    return out


def cell(model: GPT, prompt: list[int], ours: list[int], at: int | None) -> str:
    return "yes" if at is None else f"no (from step {at}; our top-2 gap there {gap_at(model, prompt, ours, at):.3g})"


def describe(cfg: ModelConfig) -> str:
    return (f"{cfg.n_layer} layers, d_model {cfg.d_model}, {cfg.n_head} heads ({cfg.n_kv_head} KV) of {cfg.head_dim}, "
            f"d_mlp {cfg.d_mlp}, vocab {cfg.vocab_size}, rope_theta {cfg.rope_theta:g}, eps {cfg.norm_eps:g}, "
            f"qk_norm {cfg.qk_norm}, tied {cfg.tie_embeddings}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "data" / "rl" / "model")
    ap.add_argument("--llama-python", default="/tmp/llvenv/bin/python")
    ap.add_argument("--dtypes", default="f32,q8_0")
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-random", action="store_true", help="skip the two random models in other layouts")
    ap.add_argument("--llama-cpp-commit", default="", help="the llama.cpp commit vendored in the build, if known")
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "gguf_llamacpp.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    model, _ = load_model(args.model)
    tok_dir = tokenizer_path(args.model)
    enc = load_encoder(tok_dir)
    cfg = model.config
    prompts = [[BOS_ID, *enc.encode_ordinary(t)] for t in TEXT_PROMPTS]
    prompts.append(prompt_ids(enc, [("user", CHAT_PROMPT)]))
    names = [*TEXT_PROMPTS, f"chat: {CHAT_PROMPT}"]
    n_new = min(args.new_tokens, cfg.max_seq_len - max(len(p) for p in prompts))
    sources = source_texts()
    vocab = vocab_texts(enc, cfg.vocab_size)
    texts = [*TEXT_PROMPTS, CHAT_PROMPT, *sources.values(), *vocab]
    chat_text = f"<|bos|><|user_start|>{CHAT_PROMPT}<|user_end|><|assistant_start|>"

    dtypes = args.dtypes.split(",")
    main_run = check_model(args, model, tok_dir, prompts, n_new, dtypes, texts, chat_text)
    randoms = {} if args.no_random else {
        f"random {label}": (m, check_model(args, m, tok_dir, prompts, n_new, ["f32"], texts[:1], chat_text))
        for label, m in (("llama GQA untied", random_model(cfg.vocab_size, qk_norm=False, tie=False)),
                         ("qwen3 GQA tied", random_model(cfg.vocab_size, qk_norm=True, tie=True)))}

    files = main_run["files"]
    lines = ["# GGUF export vs llama.cpp", "",
             f"Model `{os.path.relpath(args.model, REPO)}`: {describe(cfg)}. Greedy decoding of {n_new} new tokens "
             f"per prompt, no stop token, one prompt at a time, {args.threads} threads, prompts fed as token ids.", "",
             "## Greedy tokens: llama.cpp vs `lmforge.engine.generate`", "",
             "| prompt | " + " | ".join(f"{d} same tokens" for d in files) + " |", "|---|" + "---|" * len(files)]
    for i, name in enumerate(names):
        cells = [cell(model, prompts[i], main_run["ours"][i], res["same"][i]) for res in files.values()]
        lines.append(f"| {json.dumps(name)[1:-1]} | " + " | ".join(cells) + " |")
    lines += ["", "| file | arch | tensor types | bytes | prompts with our tokens | read-back (ours): identical "
              "tensors / max abs diff / prompts with our tokens | write s | llama.cpp load s | llama.cpp decode s |",
              "|---|---|---|---|---|---|---|---|---|"]
    for dtype, res in files.items():
        s, rb = res["summary"], res["readback"]
        lines.append(f"| {dtype} | {s['arch']} | {s['tensor_types']} | {s['bytes']:,} | "
                     f"{res['same'].count(None)}/{len(prompts)} | {rb['n_identical']}/{rb['n_tensors']} / "
                     f"{rb['max_abs_diff']:.3g} / {rb['n_prompts_same_tokens']}/{rb['n_prompts']} | "
                     f"{res['write_s']:.2f} | {res['load_s']:.2f} | {res['decode_s']:.2f} |")
    for dtype, res in files.items():
        if res["crashed"]:
            lines += ["", f"{dtype}: llama.cpp was killed by {res['crashed']}; the figures above are from a second "
                      "run with `use_extra_bufts = False` (llama.cpp's `--no-repack`: the plain CPU kernels)."]
    if llq := main_run["llq"]:
        crash = f"crashes on it too ({llq['crashed']})" if llq["crashed"] else "runs it"
        lines += ["", f"llama.cpp's own quantizer (`llama_model_quantize`, Q8_0) run on our f32 file: {llq['same']} of "
                  f"{llq['n']} tensors byte-identical to our q8_0 file's (type and data); with default settings "
                  f"llama.cpp {crash}; its greedy tokens equal those of our q8_0 file for {llq['same_tokens']} of "
                  f"{len(prompts)} prompts."]
    lines += ["", f"Ours: {main_run['ours_s']:.2f} s for the same greedy decoding (eager PyTorch, KV cache, "
              "first call included)."]
    if randoms:
        lines += ["", "## Other layouts: random weights, f32", "",
                  "| model | arch | prompts with our tokens (llama.cpp) | read-back (ours): identical tensors |",
                  "|---|---|---|---|"]
        for label, (m, run) in randoms.items():
            res = run["files"]["f32"]
            lines.append(f"| {label}: {describe(m.config)} | {res['summary']['arch']} | "
                         f"{res['same'].count(None)}/{len(prompts)} | "
                         f"{res['readback']['n_identical']}/{res['readback']['n_tensors']} |")
            lines += [f"| | | {json.dumps(names[i])[1:-1]}: {cell(m, prompts[i], run['ours'][i], at)} | |"
                      for i, at in enumerate(res["same"]) if at is not None]

    first = next(iter(files.values()))
    ours_tok = [enc.encode_ordinary(t) for t in texts]
    theirs_tok = first["tokenize"]
    n_p, n_s = len(TEXT_PROMPTS) + 1, len(sources)
    tok_rows = [("prompts' text", list(range(n_p))),
                (f"source corpora, first {SOURCE_CHARS} chars of each: {', '.join(sources)}", list(range(n_p, n_p + n_s))),
                ("every vocabulary entry's text alone", list(range(n_p + n_s, len(texts))))]
    vocab_diffs = [(texts[i], ours_tok[i], theirs_tok[i]) for i in range(n_p + n_s, len(texts))
                   if ours_tok[i] != theirs_tok[i]]
    special_same = first["tokenize_special"][0] == prompts[-1]
    lines += ["", f"## Tokenization: llama.cpp (`tokenizer.ggml.pre = \"{PRE_TOKENIZER}\"`) vs ours (tiktoken)", "",
              "| texts | n | same ids | tokens (ours) |", "|---|---|---|---|"]
    for label, idx in tok_rows:
        same = sum(ours_tok[i] == theirs_tok[i] for i in idx)
        lines.append(f"| {label} | {len(idx)} | {same} | {sum(len(ours_tok[i]) for i in idx):,} |")
    lines.append(f"| chat prompt, template text with special tokens parsed | 1 | {int(special_same)} | "
                 f"{len(prompts[-1])} |")
    if vocab_diffs:
        lines += ["", "Vocabulary entries llama.cpp splits differently (merges applied, no ignore_merges):", ""]
        lines += [f"- {json.dumps(t)}: ours {a}, llama.cpp {b}" for t, a, b in vocab_diffs[:20]]
    lines += ["", "## Versions", "",
              f"- llama-cpp-python {first['llama_cpp_python']} (llama.cpp {first['llama_cpp']}"
              + (f", commit {args.llama_cpp_commit}" if args.llama_cpp_commit else "") + "), built from source "
              f"with `pip install llama-cpp-python` in {build_time()} (wall, /tmp/llbuild.time) on this machine",
              f"- gguf {_gguf_version()}, torch {torch.__version__}, "
              f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} CPUs",
              f"- llama.cpp CPU features: {first['system_info']}", ""]
    text = "\n".join(lines)
    print(text)
    write_text(args.out, text)


def _gguf_version() -> str:
    from importlib.metadata import version
    return version("gguf")


if __name__ == "__main__":
    main()
