"""The tokenizer: byte-level BPE trained with HF `tokenizers`, encoded with `tiktoken`.

    from lmforge.tokenizer import TokenizerConfig, train, save, load, load_encoder
    cfg = TokenizerConfig(vocab_size=2048)
    tok = train(texts, cfg)                 # tokenizers.Tokenizer
    save(tok, "out/tokenizer")              # tokenizer.json + tokenizer_config.json
    enc = load_encoder("out/tokenizer")     # tiktoken.Encoding with the same ids, ~3x faster
    enc.encode_ordinary("text")             # corpus text: special strings stay plain text
    with corpus_encoder(enc, threads=2) as encode:
        arrays = encode(list_of_texts)      # what the stage uses: uint32 arrays, multi-threaded

`transformers.AutoTokenizer.from_pretrained("out/tokenizer")` loads the same tokenizer; it
prepends `<|bos|>` when `add_special_tokens=True`, as documents are laid out in the token
shards. (Text that contains special-token strings such as `<|user_start|>` is the exception:
transformers maps them to special ids unless called with `split_special_tokens=True`, while the
shards keep them as plain text.) The `tokenizer` stage is `run(cfg, {"mix": mix_dir}, out_dir)`: it trains on the
mix's train split and writes `out_dir/tokenizer/` and `out_dir/tokens/` (see lmforge.tokens).

Special tokens sit at the lowest ids in a fixed order (see `NAMED_SPECIALS`), then reserved
ones up to `n_special`, then the 256 byte tokens, then merges. Special-token strings found in
corpus text are encoded as ordinary text (tiktoken `encode_ordinary`, HF
`encode_special_tokens=True`, transformers `split_special_tokens=True`), so data can never
forge a chat turn; only code that builds prompts on purpose produces special ids.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import tiktoken
from pydantic import ValidationInfo, field_validator
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm import tqdm

from .atomic import atomic_path
from .config import StageConfig
from .digest import canonical_json
from .errors import InputError, LmforgeError
from .inputs import MAX_TOKENIZER_BYTES, check_size
from .tokens import Check, Docs, Ids, SplitStats, iter_prefix, split_files, write_index, write_split

log = logging.getLogger(__name__)

# GPT-4's split pattern with two changes: digits are split one by one (\p{N}, not \p{N}{1,3}),
# and contractions are matched as ASCII ('[sS]...) rather than with (?i:), because the two regex
# engines (Oniguruma in tokenizers, fancy-regex in tiktoken) fold Unicode case differently.
SPLIT_PATTERN = (
    r"""'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# Fixed order: ids 0..6. Append new names only at the end (they take a reserved slot), never
# reorder: ids are baked into every token shard and checkpoint.
NAMED_SPECIALS = ("bos", "user_start", "user_end", "assistant_start", "assistant_end", "system_start", "system_end")
BOS = "<|bos|>"
BOS_ID = 0
# The chat format of lmforge.chat.render as a Jinja template for transformers'
# apply_chat_template (which renders it, then encodes the string without adding BOS).
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '_start|>' + message['content'] + '<|' + message['role'] + '_end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant_start|>' }}{% endif %}"
)
TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
MAX_UINT16_VOCAB = 1 << 16


def special_tokens(n_special: int = 16) -> list[str]:
    """All special token strings, id order: the named ones, then `<|reserved_i|>`."""
    if n_special < len(NAMED_SPECIALS):
        raise LmforgeError(f"n_special={n_special} is below the {len(NAMED_SPECIALS)} named special tokens")
    named = [f"<|{name}|>" for name in NAMED_SPECIALS]
    return named + [f"<|reserved_{i}|>" for i in range(n_special - len(named))]


def special_id(name: str, n_special: int = 16) -> int:
    """Id of a special token by name ('bos', 'reserved_3') or string ('<|bos|>')."""
    token = name if name.startswith("<|") else f"<|{name}|>"
    tokens = special_tokens(n_special)
    if token not in tokens:
        raise LmforgeError(f"unknown special token {name!r}; known: {', '.join(tokens)}")
    return tokens.index(token)


class TokenizerConfig(StageConfig):
    """params.yaml section `tokenizer`."""

    n_special: int = 16
    vocab_size: int
    min_frequency: int = 2
    train_max_bytes: int | None = None
    encode_threads: int = 0
    model_max_length: int = 1024
    verify_val: bool = True

    @field_validator("n_special")
    @classmethod
    def _n_special(cls, v: int) -> int:
        if not len(NAMED_SPECIALS) <= v <= 4096:
            raise ValueError(f"must be between {len(NAMED_SPECIALS)} (the named special tokens) and 4096")
        return v

    @field_validator("vocab_size")
    @classmethod
    def _vocab_size(cls, v: int, info: ValidationInfo) -> int:
        floor = 256 + info.data.get("n_special", 16)
        if v <= floor:
            raise ValueError(f"must be above 256 byte tokens + n_special = {floor} to leave room for merges; "
                             f"set vocab_size to at least {floor + 1}")
        if v > 1 << 31:
            raise ValueError("must be at most 2**31 (token shards are uint16 up to 65536, else uint32)")
        return v

    @field_validator("min_frequency", "model_max_length")
    @classmethod
    def _positive(cls, v: int) -> int:
        if v < 1:
            raise ValueError("must be at least 1")
        return v

    @field_validator("train_max_bytes")
    @classmethod
    def _cap(cls, v: int | None) -> int | None:
        if v is not None and v < 1:
            raise ValueError("must be a positive number of bytes, or null for the whole train split")
        return v

    @field_validator("encode_threads")
    @classmethod
    def _threads(cls, v: int) -> int:
        if v < 0:
            raise ValueError("must be 0 (all cores) or a positive thread count")
        return v

    @property
    def shard_dtype(self) -> str:
        return "uint16" if self.vocab_size <= MAX_UINT16_VOCAB else "uint32"


def byte_chars() -> dict[int, str]:
    """The byte -> printable character table of byte-level BPE (GPT-2's convention).

    Printable Latin-1 bytes stand for themselves; the rest are shifted to chr(256 + k) in byte
    order, so every token string in tokenizer.json is printable.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in keep}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return dict(sorted(table.items()))


def _pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])


def train(texts: Iterable[str] | Iterable[Sequence[str]], cfg: TokenizerConfig, *,
          progress: bool = False) -> Tokenizer:
    """Train byte-level BPE on `texts` (strings, or batches of strings).

    Deterministic: tokenizers breaks count ties by pair id, so the result does not depend on
    the thread count (tests check parallel == sequential).
    """
    specials = special_tokens(cfg.n_special)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = _pre_tokenizer()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=cfg.vocab_size,
        min_frequency=cfg.min_frequency,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tok.train_from_iterator(texts, trainer)
    # A pre-token that is already one token is emitted whole, as tiktoken does; without this
    # the two encoders could segment such words differently.
    tok.model.ignore_merges = True
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    for i, token in enumerate(specials):
        if tok.token_to_id(token) != i:
            raise LmforgeError(f"special token {token} got id {tok.token_to_id(token)}, expected {i}")
    return tok


def vocab_size(tok: Tokenizer) -> int:
    return tok.get_vocab_size(with_added_tokens=True)


def save(tok: Tokenizer, directory: str | Path, *, model_max_length: int = 1024) -> Path:
    """Write `tokenizer.json` and `tokenizer_config.json` into `directory`, atomically."""
    directory = Path(directory)
    added = tok.get_added_tokens_decoder()
    specials = [added[i].content for i in sorted(added) if added[i].special]
    if specials[:1] != [BOS]:
        raise LmforgeError(f"tokenizer's first special token is {specials[:1]}, expected {BOS}; train it with train()")
    hf_config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        # 'additional_special_tokens' is what transformers 4.x reads; 5.x maps it to extra_special_tokens.
        "additional_special_tokens": specials[1:],
        "model_max_length": model_max_length,
        # transformers would otherwise "clean" spaces before punctuation on decode.
        "clean_up_tokenization_spaces": False,
        # apply_chat_template renders conversations as lmforge.chat.render does (tested)
        "chat_template": CHAT_TEMPLATE,
    }
    with atomic_path(directory) as tmp:
        tmp.mkdir()
        # to_str is stable for a given model (vocab is written sorted by id); re-dumping with
        # sorted keys also pins the layout against dict-order changes in future versions.
        (tmp / TOKENIZER_FILE).write_text(canonical_json(json.loads(tok.to_str())) + "\n", encoding="utf-8")
        (tmp / CONFIG_FILE).write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return directory


def load(directory: str | Path) -> Tokenizer:
    path = Path(directory) / TOKENIZER_FILE
    if not path.is_file():
        raise InputError(path, "not found", fix="run the tokenizer stage, or pass the directory it wrote")
    check_size(path, MAX_TOKENIZER_BYTES, "a tokenizer file", "re-run the tokenizer stage, or point at a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises bare Exception on malformed files
        raise InputError(path, f"not a valid tokenizers file ({e})", fix="re-run the tokenizer stage") from None


def _expect(path: Path, ok: bool, what: str) -> None:
    if not ok:
        raise InputError(path, f"{what}; a tiktoken encoder built from it would give different ids",
                         fix="use a tokenizer trained by lmforge.tokenizer.train")


def encoder_from_json(spec: dict[str, Any], path: Path) -> tiktoken.Encoding:
    """A tiktoken Encoding with the ids of the tokenizer described by `spec` (tokenizer.json)."""
    model, pre = spec.get("model") or {}, spec.get("pre_tokenizer") or {}
    _expect(path, model.get("type") == "BPE", "model is not BPE")
    _expect(path, spec.get("normalizer") is None, "it has a normalizer")
    # tiktoken emits a pre-token that is itself a token whole; BPE does that only with ignore_merges.
    _expect(path, model.get("ignore_merges") is True, "BPE ignore_merges is off")
    _expect(path, not any(model.get(k) for k in ("dropout", "continuing_subword_prefix", "end_of_word_suffix",
                                                  "byte_fallback")), "BPE options tiktoken lacks are set")
    parts = pre.get("pretokenizers") or []
    _expect(path, pre.get("type") == "Sequence" and [p.get("type") for p in parts] == ["Split", "ByteLevel"]
            and parts[0].get("behavior") == "Isolated" and not parts[0].get("invert")
            and "Regex" in parts[0].get("pattern", {}) and parts[1].get("use_regex") is False
            and parts[1].get("add_prefix_space") is False,
            "pre-tokenizer is not Split(regex, isolated) + ByteLevel(use_regex=False)")
    specials = {t["content"]: t["id"] for t in spec.get("added_tokens", []) if t.get("special")}
    to_byte = {c: b for b, c in byte_chars().items()}
    ranks: dict[bytes, int] = {}
    for token, rank in model["vocab"].items():
        if token in specials:
            continue
        try:
            ranks[bytes(to_byte[c] for c in token)] = rank
        except KeyError:
            _expect(path, False, f"token {token!r} is not in byte-level form")
    _expect(path, all(bytes([b]) in ranks for b in range(256)), "not all 256 bytes are tokens")
    # The regex makes "<|", "name", "|>" separate pre-tokens, so no merge can spell a special.
    clash = sorted(s for s in specials if s.encode("utf-8") in ranks)
    _expect(path, not clash, f"ordinary tokens spell special tokens {clash}")
    return tiktoken.Encoding(
        f"lmforge-{path.parent.name}",
        pat_str=parts[0]["pattern"]["Regex"],
        mergeable_ranks=ranks,
        special_tokens=specials,
        explicit_n_vocab=len(ranks) + len(specials),
    )


@contextlib.contextmanager
def corpus_encoder(enc: tiktoken.Encoding, threads: int) -> Iterator[Callable[[list[str]], list[np.ndarray]]]:
    """A batch encoder for corpus text on `threads` threads: special strings stay plain text.

    Yields `encode(texts) -> [uint32 array per text]`. Same ids as `enc.encode_ordinary_batch`
    but tiktoken fills numpy buffers instead of Python lists of ints, which costs the GIL-bound
    part of encoding (list building) that keeps threads from scaling. With no special tokens
    allowed and none disallowed, `encode` treats special strings exactly as `encode_ordinary`.
    """
    def one(text: str) -> np.ndarray:
        return enc.encode_to_numpy(text, allowed_special=set(), disallowed_special=())

    if threads <= 1:
        yield lambda texts: [one(t) for t in texts]
        return
    with ThreadPoolExecutor(max_workers=threads, thread_name_prefix="lmforge-encode") as pool:
        yield lambda texts: list(pool.map(one, texts))


def encoder(tok: Tokenizer) -> tiktoken.Encoding:
    """The tiktoken Encoding of an in-memory tokenizer."""
    return encoder_from_json(json.loads(tok.to_str()), Path("<memory>") / TOKENIZER_FILE)


def load_encoder(directory: str | Path) -> tiktoken.Encoding:
    """The tiktoken Encoding of a saved tokenizer directory."""
    path = Path(directory) / TOKENIZER_FILE
    load(directory)  # the same checks and errors as loading it with tokenizers
    return encoder_from_json(json.loads(path.read_text(encoding="utf-8")), path)


def _threads(cfg: TokenizerConfig) -> int:
    if cfg.encode_threads:
        return cfg.encode_threads
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


class _Counted:
    """Passes text batches through to the trainer, counting their UTF-8 bytes."""

    def __init__(self, batches: Iterable[list[str]]):
        self.batches = batches
        self.n_bytes = 0

    def __iter__(self) -> Iterator[list[str]]:
        for texts in self.batches:
            self.n_bytes += sum(len(t.encode("utf-8")) for t in texts)
            yield texts


def _same_as_tokenizers(tok: Tokenizer) -> Check:
    """A batch check: tiktoken's ids must equal tokenizers' ids for corpus text."""
    reference = Tokenizer.from_str(tok.to_str())
    reference.encode_special_tokens = True  # corpus text: special strings are plain text

    def check(docs: Docs, ids: Ids) -> None:
        expected = reference.encode_batch(docs.texts, add_special_tokens=False)
        for doc_id, got_ids, want in zip(docs.ids, ids, expected, strict=True):
            got = np.asarray(got_ids).tolist()
            if got != want.ids:
                pairs = enumerate(zip(got, want.ids, strict=False))
                at = next((i for i, (a, b) in pairs if a != b), min(len(got), len(want.ids)))
                raise LmforgeError(
                    f"document {doc_id!r}: tiktoken and tokenizers disagree from token {at} "
                    f"({got[at:at + 5]} vs {want.ids[at:at + 5]}); this is a bug in lmforge's encoder, please "
                    "report it with that document (set tokenizer.verify_val: false to skip the check)")
    return check


class _Timed(Protocol):
    timings: dict[str, float]


def run(cfg: TokenizerConfig, inputs: Mapping[str, str | Path], out_dir: str | Path, *,
        ctx: _Timed | None = None, progress: bool | None = None) -> dict[str, Any]:
    """The `tokenizer` stage: train on the mix's train split, save it, write token shards.

    Writes `out_dir/tokenizer/` and `out_dir/tokens/`, each atomically. Returns deterministic
    metrics only; wall-clock figures go into `ctx.timings` (a lmforge.context.RunContext).
    Progress bars show when `progress` is true, or by default when stderr is a terminal.
    """
    if progress is None:
        progress = sys.stderr.isatty()
    if "mix" not in inputs:
        raise LmforgeError(f"tokenizer stage: inputs has no 'mix' (got {sorted(inputs)}); pass the mix output dir")
    mix_dir, out_dir = Path(inputs["mix"]), Path(out_dir)
    if not mix_dir.is_dir():
        raise InputError(mix_dir, "the mix output directory does not exist", fix="run the mix stage first")
    files = {split: split_files(mix_dir, split) for split in ("train", "val")}
    clock: dict[str, float] = {}

    start = time.perf_counter()
    corpus = _Counted(iter_prefix(files["train"], cfg.train_max_bytes))
    tok = train(corpus, cfg, progress=progress)
    clock["train_s"] = time.perf_counter() - start
    if corpus.n_bytes == 0:
        raise InputError(mix_dir / "train", "the train split holds no text to train the tokenizer on",
                         fix="check the mix stage's filters and sources")
    clock["train_mb_per_s"] = corpus.n_bytes / 1e6 / max(clock["train_s"], 1e-9)
    n_vocab = vocab_size(tok)
    if n_vocab < cfg.vocab_size:
        log.warning("vocabulary has %d tokens, below vocab_size=%d: the train text (%d bytes) has too few "
                    "pairs seen %d+ times", n_vocab, cfg.vocab_size, corpus.n_bytes, cfg.min_frequency)
    stats: dict[str, SplitStats] = {}
    with (corpus_encoder(encoder(tok), _threads(cfg)) as encode,
          atomic_path(out_dir / "tokenizer") as tok_tmp, atomic_path(out_dir / "tokens") as tokens_tmp):
        save(tok, tok_tmp, model_max_length=cfg.model_max_length)
        tokens_tmp.mkdir()
        for split in ("train", "val"):
            start = time.perf_counter()
            check = _same_as_tokenizers(tok) if split == "val" and cfg.verify_val else None
            with tqdm(desc=f"encode {split}", unit="B", unit_scale=True, disable=not progress) as bar:
                stats[split] = write_split(files[split], tokens_tmp, split, encode=encode, bos_id=BOS_ID,
                                           dtype=cfg.shard_dtype, check=check, progress=bar.update)
            clock[f"encode_{split}_s"] = time.perf_counter() - start
            clock[f"encode_{split}_tokens_per_s"] = stats[split].n_tokens / max(clock[f"encode_{split}_s"], 1e-9)
        val = stats["val"]
        if val.n_tokens == val.n_docs:
            raise InputError(mix_dir / "val", "the val split holds no text, so bytes per token cannot be measured",
                             fix="give the mix a non-empty val split")
        write_index(tokens_tmp, dtype=cfg.shard_dtype, vocab_size=n_vocab, bos_id=BOS_ID, splits=stats)

    if ctx is not None:
        ctx.timings.update(clock)
    log.info("tokenizer timings: %s", {k: round(v, 3) for k, v in clock.items()})
    return {
        "vocab_size": n_vocab,
        "tokenizer_train_bytes": corpus.n_bytes,
        "train_tokens": stats["train"].n_tokens,
        "val_tokens": val.n_tokens,
        "train_docs": stats["train"].n_docs,
        "val_docs": val.n_docs,
        "bytes_per_token": round(val.n_bytes / (val.n_tokens - val.n_docs), 6),
        "bytes_per_token_by_source": {
            name: round(row["bytes"] / row["text_tokens"], 6)
            for name, row in sorted(val.by_source.items()) if row["text_tokens"]
        },
    }
