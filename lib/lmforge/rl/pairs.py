"""Preference pairs. Built ones are verifiable: chosen = a correct worked solution, rejected = the
same solution with its last result and final answer changed to a wrong number. Your own pairs
load from jsonl (`read_pairs`): {"messages": [...the prompt turns...], "chosen": "...",
"rejected": "..."} per line, errors naming the file and line.

The rejected reply stays well-formed (its last equation and `#### N` agree with each other),
so what separates it from the chosen one is only that the arithmetic is wrong: exactly what
`mathgen.check_equations` and the exact answer verify. The wrong number is drawn from a seed
per record, so the pairs are a pure function of (conversations, seed).
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ..chat import Turns, check
from ..data.chats import Conversation
from ..data.jsonl import records, text_of
from ..data.mathgen import check_equations, extract_answer
from ..errors import InputError, LmforgeError


@dataclass(frozen=True)
class Pair:
    id: str
    prompt: Turns          # the conversation up to the reply
    chosen: str
    rejected: str


class PairError(LmforgeError, ValueError):
    """A preference pair that cannot teach anything; the message names the record."""


def check_pair(p: Pair) -> Pair:
    if p.chosen == p.rejected:
        raise PairError(f"pair {p.id}: chosen and rejected replies are identical (fix: drop the pair, "
                        "or give a rejected reply that differs)")
    if not p.chosen.strip() or not p.rejected.strip():
        raise PairError(f"pair {p.id}: an empty reply (fix: give both replies text)")
    return p


def corrupt(solution: str, answer: int, rng: random.Random) -> str:
    """`solution` with its final answer (and the last equation's result, where it is the
    answer) replaced by a nearby wrong non-negative number."""
    wrong = answer
    while wrong == answer or wrong < 0:
        wrong = answer + rng.choice([-1, 1]) * rng.randint(1, max(3, answer // 10 + 1))
    body, _, _ = solution.rpartition("####")
    # the last "= answer" in the body becomes "= wrong" (the step that produced the answer)
    matches = list(re.finditer(rf"= {answer}(?!\d)", body))
    if matches:
        m = matches[-1]
        body = body[:m.start()] + f"= {wrong}" + body[m.end():]
    return f"{body}#### {wrong}"


def build_pairs(convs: Sequence[Conversation], seed: int) -> list[Pair]:
    """A pair per graded conversation whose reply verifies (its equations hold, its answer is right)."""
    out = []
    for c in convs:
        if c.answer is None or c.turns[-1][0] != "assistant":
            continue
        chosen = c.turns[-1][1]
        if extract_answer(chosen) != c.answer or check_equations(chosen):
            continue
        rejected = corrupt(chosen, c.answer, random.Random(f"lmforge.pairs:{seed}:{c.id}"))
        out.append(check_pair(Pair(c.id, c.turns[:-1], chosen, rejected)))
    return out


def read_pairs(path: str | Path) -> list[Pair]:
    """Preference pairs from a jsonl file; the record is named in every error."""
    path = Path(path)
    out = []
    for line, _, rec in records(path):
        where = f"{path}:{line}"
        if "messages" not in rec:
            raise InputError(path, "missing field 'messages' (the prompt turns)", line=line,
                             fix='write {"messages": [{"role": "user", "content": ...}], "chosen": ..., "rejected": ...}')
        prompt = check(rec["messages"], where, need_assistant=False)
        if prompt[-1][0] != "user":
            raise InputError(path, "the prompt must end with a user turn (the replies answer it)", line=line,
                             fix="end 'messages' with the user turn; put the replies in 'chosen' and 'rejected'")
        chosen, rejected = (text_of(rec, k, path, line) for k in ("chosen", "rejected"))
        out.append(check_pair(Pair(where, prompt, chosen, rejected)))
    if not out:
        raise InputError(path, "no preference pairs", fix="add lines, or remove the file from rl.dpo.files")
    return out
