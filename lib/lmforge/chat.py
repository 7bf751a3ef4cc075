"""Chat rendering: conversation turns -> token ids with the tokenizer's special tokens.

    <|bos|> <|user_start|> question <|user_end|> <|assistant_start|> answer <|assistant_end|>

Turn text is encoded as ordinary text (special-token strings inside it stay plain text), so
data can never forge a turn. `qa_turns` reads the mix's task documents, "Question: ...\\n
Answer: ...", as one user turn and one assistant turn.
"""

from __future__ import annotations

import numpy as np
import tiktoken

from .tokenizer import BOS

ROLES = ("system", "user", "assistant")
QUESTION, ANSWER = "Question:", "\nAnswer:"


def render(enc: tiktoken.Encoding, turns: list[tuple[str, str]]) -> np.ndarray:
    """The ids of a conversation: BOS, then each (role, text) turn between its role's markers."""
    ids = [enc.encode_single_token(BOS)]
    for role, text in turns:
        if role not in ROLES:
            raise ValueError(f"unknown chat role {role!r} (expected one of {', '.join(ROLES)})")
        ids.append(enc.encode_single_token(f"<|{role}_start|>"))
        ids.extend(enc.encode_ordinary(text))
        ids.append(enc.encode_single_token(f"<|{role}_end|>"))
    return np.asarray(ids, dtype=np.int64)


def qa_turns(text: str) -> list[tuple[str, str]] | None:
    """A "Question: ... Answer: ..." document as [(user, question), (assistant, answer)];
    None if the document is not in that form."""
    if not text.startswith(QUESTION) or ANSWER not in text:
        return None
    q, a = text[len(QUESTION):].split(ANSWER, 1)
    q, a = q.strip(), a.strip()
    return [("user", q), ("assistant", a)] if q and a else None
