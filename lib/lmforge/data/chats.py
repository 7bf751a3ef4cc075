"""Conversation sets for SFT and RL: built-in templated chats over generated math, users' jsonl
conversations and Hugging Face datasets in messages format, through one path into one table.

    sets = [ChatSet(name="drills", kind="drill", n=4000), ChatSet(name="mine", kind="jsonl", path="my.jsonl")]
    convs = build(sets, seed=7, where="params.yaml: sft.data.sets")   # list[Conversation]

Kinds:
- `math_word` / `math_arithmetic`: lmforge.data.mathgen problems (GSM8K-style word problems,
  multi-step arithmetic) as user question -> assistant worked solution ending `#### N`.
- `drill`: one-step sums and differences, "What is 37 + 45?" -> "37 + 45 = 82\\n#### 82",
  operands up to `max_operand`: a task family small models can learn, so RL has signal.
- `rst_faq`: real question/answer text: in a jsonl source of reStructuredText documents (the
  mix's `python_docs`), every section whose title is a question becomes user: title ->
  assistant: the section's text (its first `max_chars`, cut at a paragraph).
- `jsonl`: a file of {"messages": [{"role", "content"}, ...]} per line (errors name file:line).
- `hf`: `datasets.load_dataset(path, split=split)` with a messages column `field`: a local
  directory of json / parquet files, or a Hub dataset already in the cache (offline).

Every conversation gets a split from the SHA-256 of its user turns (`prompt_key`): the same
prompt always lands in the same split, whichever set or seed produced it, so train and
held-out never share a prompt (`assert_disjoint` checks it by hash). Math conversations keep
their exact answer for grading.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import pandas as pd
import pandera.pandas as pa
from pydantic import model_validator

from ..chat import Turns, check
from ..config import Config
from ..errors import InputError, LmforgeError
from . import mathgen
from .jsonl import records, text_of

Kind = Literal["math_word", "math_arithmetic", "drill", "rst_faq", "jsonl", "hf"]
SPLITS = ("train", "heldout")


class ChatSet(Config):
    name: str
    kind: Kind
    n: int | None = None            # how many (generated kinds: required; files: the first n, default all)
    path: str | None = None         # jsonl file, or dataset directory / Hub id (hf)
    split: str = "train"            # hf: the dataset split
    field: str | None = None        # jsonl / hf: the messages column ("messages"); rst_faq: the text ("text")
    max_operand: int = 99           # drill: operands are 0..max_operand
    max_chars: int = 1500           # rst_faq: longest answer kept

    @model_validator(mode="after")
    def _fields(self) -> ChatSet:
        generated = self.kind in ("math_word", "math_arithmetic", "drill")
        if generated and (self.n is None or self.n < 1):
            raise ValueError(f"set '{self.name}': kind {self.kind} needs n >= 1 (how many conversations)")
        if not generated and not self.path:
            raise ValueError(f"set '{self.name}': kind {self.kind} needs a path")
        if self.n is not None and self.n < 1:
            raise ValueError(f"set '{self.name}': n must be >= 1 (got {self.n})")
        if self.max_operand < 1:
            raise ValueError(f"set '{self.name}': max_operand must be >= 1 (got {self.max_operand})")
        return self

    @property
    def column(self) -> str:
        """The field read: `field`, else "text" for rst_faq and "messages" for files and datasets."""
        return self.field or ("text" if self.kind == "rst_faq" else "messages")


@dataclass(frozen=True)
class Conversation:
    id: str
    source: str
    turns: Turns
    answer: int | None = None  # the exact answer of a math problem

    @property
    def key(self) -> str:
        return prompt_key(self.turns)

    @property
    def messages(self) -> list[dict[str, str]]:
        return [{"role": r, "content": c} for r, c in self.turns]


def prompt_key(turns: Turns) -> str:
    """SHA-256 of the conversation's user turns, whitespace-normalised: its identity for splits."""
    users = "\x1e".join(" ".join(c.split()) for r, c in turns if r == "user")
    return hashlib.sha256(users.encode("utf-8")).hexdigest()


def split_of(key: str, heldout_fraction: float) -> str:
    return "heldout" if int(key[:16], 16) < heldout_fraction * 2**64 else "train"


def assert_disjoint(train: Iterable[Conversation], heldout: Iterable[Conversation]) -> int:
    """The number of held-out prompts; raises if any of them is also a training prompt."""
    held = {c.key for c in heldout}
    shared = held & {c.key for c in train}
    if shared:
        raise LmforgeError(f"{len(shared)} prompts are both in train and held-out (e.g. sha256 {min(shared)[:16]})")
    return len(held)


# --- built-in sets ------------------------------------------------------------------------------

def drill(rng: random.Random, max_operand: int) -> tuple[str, str, int]:
    a, b = rng.randint(0, max_operand), rng.randint(0, max_operand)
    if rng.random() < 0.5:
        return f"What is {a} + {b}?", f"{a} + {b} = {a + b}\n#### {a + b}", a + b
    a, b = max(a, b), min(a, b)
    return f"What is {a} - {b}?", f"{a} - {b} = {a - b}\n#### {a - b}", a - b


def _generated(s: ChatSet, seed: int) -> list[Conversation]:
    assert s.n is not None
    if s.kind == "drill":
        out = []
        for i in range(s.n):
            q, a, ans = drill(random.Random(f"lmforge.chats:{s.name}:{seed}:{i}"), s.max_operand)
            out.append(Conversation(f"{s.name}-{i}", s.name, [("user", q), ("assistant", a)], ans))
        return out
    names = mathgen.WORD_TEMPLATES if s.kind == "math_word" else mathgen.ARITHMETIC_TEMPLATES
    return [Conversation(f"{s.name}-{i}", s.name, [("user", r["question"]), ("assistant", r["solution"])], r["answer"])
            for i, r in enumerate(mathgen.generate(s.n, seed, names))]


# an rst section title that asks something: a line ending in "?", underlined with one character
_RST_QUESTION = re.compile(r"(?m)^(?P<q>[^\n]{8,200}\?)\n(?P<u>[-=^~*#\"'`+]{3,})[ \t]*$")
_RST_TITLE = re.compile(r"(?m)^[^\n]+\n([-=^~*#\"'`+])\1{2,}[ \t]*$")


def _faq_answer(body: str, max_chars: int) -> str:
    end = _RST_TITLE.search(body)
    body = (body[:end.start()] if end else body).strip()
    if len(body) > max_chars:  # whole paragraphs, or whole words when the first is longer
        cut = body[:max_chars]
        body = cut.rsplit("\n\n", 1)[0] if "\n\n" in cut else cut.rsplit(" ", 1)[0]
    return body.strip()


def _from_rst_faq(s: ChatSet) -> list[Conversation]:
    path = Path(str(s.path))
    out: list[Conversation] = []
    for line, _, rec in records(path):
        text = text_of(rec, s.column, path, line)
        for m in _RST_QUESTION.finditer(text):
            answer = _faq_answer(text[m.end():], s.max_chars)
            if len(answer) >= 40 and not answer.lower().startswith("see the next question"):
                out.append(Conversation(f"{s.name}-{line}-{m.start()}", s.name,
                                        [("user", m.group("q").strip()), ("assistant", answer)]))
            if s.n is not None and len(out) == s.n:
                return out
    if not out:
        raise InputError(path, "no question sections found (titles ending in '?', underlined)",
                         fix="point rst_faq at reStructuredText documents, or remove the set")
    return out


def _from_jsonl(s: ChatSet) -> list[Conversation]:
    path = Path(str(s.path))
    out = []
    for line, _, rec in records(path):
        if s.column not in rec:
            raise InputError(path, f"missing field '{s.column}'", line=line,
                             fix=f'every line is {{"{s.column}": [{{"role": ..., "content": ...}}, ...]}}')
        out.append(Conversation(f"{s.name}-{line}", s.name, check(rec[s.column], f"{path}:{line}")))
        if s.n is not None and len(out) == s.n:
            break
    if not out:
        raise InputError(path, "no conversations", fix="add lines, or remove the set")
    return out


def _from_hf(s: ChatSet) -> list[Conversation]:
    import datasets

    try:
        ds = datasets.load_dataset(str(s.path), split=s.split)
    except Exception as e:  # datasets raises many kinds: not found, offline, bad files
        raise InputError(str(s.path), f"cannot load split '{s.split}' with datasets ({type(e).__name__}: {e})",
                         fix="give a local directory of json/parquet files, or a Hub id already cached") from None
    if s.column not in ds.column_names:
        raise InputError(str(s.path), f"no column '{s.column}' (columns: {', '.join(ds.column_names)})",
                         fix="set the set's field to the messages column")
    n = len(ds) if s.n is None else min(s.n, len(ds))
    return [Conversation(f"{s.name}-{i}", s.name, check(ds[i][s.column], f"{s.path} [{s.split}] row {i}"))
            for i in range(n)]


def build(sets: Sequence[ChatSet], seed: int) -> list[Conversation]:
    """Every set's conversations, in order; ids are unique ("<set>-<index or line>")."""
    names = [s.name for s in sets]
    if len(set(names)) != len(names):
        raise LmforgeError(f"set names must be unique (got {names})")
    out: list[Conversation] = []
    for s in sets:
        if s.kind in ("math_word", "math_arithmetic", "drill"):
            out += _generated(s, seed)
        else:
            out += {"rst_faq": _from_rst_faq, "jsonl": _from_jsonl, "hf": _from_hf}[s.kind](s)
    return out


# --- the table --------------------------------------------------------------------------------

def _valid_messages(col: pd.Series) -> pd.Series:
    def ok(text: str) -> bool:
        try:
            check(json.loads(text), "")
        except (ValueError, TypeError):
            return False
        return True
    return col.map(ok)


SCHEMA = pa.DataFrameSchema(
    {
        "id": pa.Column(str, unique=True),
        "source": pa.Column(str),
        "split": pa.Column(str, pa.Check.isin(SPLITS)),
        "prompt_sha256": pa.Column(str, pa.Check.str_matches(r"^[0-9a-f]{64}$")),
        "messages": pa.Column(str, pa.Check(_valid_messages, error="messages: valid conversation JSON")),
        "answer": pa.Column("Int64", nullable=True),
    },
    strict=True,
    name="conversations",
)


def table(convs: Sequence[Conversation], heldout_fraction: float) -> pd.DataFrame:
    """The conversations as a validated table with their split."""
    df = pd.DataFrame({
        "id": [c.id for c in convs],
        "source": [c.source for c in convs],
        "split": [split_of(c.key, heldout_fraction) for c in convs],
        "prompt_sha256": [c.key for c in convs],
        "messages": [json.dumps(c.messages, ensure_ascii=False) for c in convs],
        "answer": pd.array([c.answer for c in convs], dtype="Int64"),
    })
    return SCHEMA.validate(df)


def from_table(df: pd.DataFrame) -> list[Conversation]:
    return [Conversation(r.id, r.source, [(m["role"], m["content"]) for m in json.loads(r.messages)],
                         None if pd.isna(r.answer) else int(r.answer))
            for r in df.itertuples(index=False)]
