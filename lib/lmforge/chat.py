"""The chat format: conversations -> token ids, a loss mask, and the matching HF chat template.

    <|bos|> [<|system_start|> text <|system_end|>] <|user_start|> question <|user_end|>
            <|assistant_start|> answer <|assistant_end|> ...

A conversation is Hugging Face's messages format, a list of {"role", "content"} with roles
system (first only), user and assistant; `check` validates one and names the record when it
is not. `render` gives the ids and, with `mask=True`, which positions are trained: the tokens
of every assistant turn and its <|assistant_end|> (so the model learns to stop), nothing else.
`prompt_ids` renders a conversation up to and including a fresh <|assistant_start|>, the
input for generating the next reply.

Turn text is encoded as ordinary text (special-token strings inside it stay plain text), so
data can never forge a turn. `lmforge.tokenizer.CHAT_TEMPLATE` (written into
tokenizer_config.json by the tokenizer stage) makes `transformers`' `apply_chat_template`
produce the same ids, except for content holding special-token strings, which transformers
parses as markers.
`qa_turns` reads the mix's task documents, "Question: ...\\nAnswer: ...", as a conversation.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tiktoken

from .errors import LmforgeError
from .tokenizer import BOS

ROLES = ("system", "user", "assistant")
QUESTION, ANSWER = "Question:", "\nAnswer:"
ASSISTANT_START, ASSISTANT_END = "<|assistant_start|>", "<|assistant_end|>"

Turns = list[tuple[str, str]]  # (role, content)


class ChatError(LmforgeError, ValueError):
    """A conversation that cannot be rendered; the message names the record."""


def check(messages: Any, where: str, *, need_assistant: bool = True) -> Turns:
    """A messages list as (role, content) turns, or a ChatError naming `where` (a file and
    line, or a record id) and what is wrong: not a list of {role, content}, an unknown role,
    a system turn that is not first, empty content, content that is not valid Unicode (a lone
    surrogate), or (`need_assistant`) no assistant turn."""
    def fail(problem: str, fix: str) -> ChatError:
        return ChatError(f"{where}: {problem} (fix: {fix})")

    if not isinstance(messages, Sequence) or isinstance(messages, str) or not messages:
        raise fail("'messages' must be a non-empty list of {role, content} objects",
                   'write "messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}]')
    turns: Turns = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise fail(f"message {i} is not an object with string 'role' and 'content'",
                       'each message is {"role": "...", "content": "..."}')
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise fail(f"message {i} has unknown role {role!r}", f"use one of {', '.join(ROLES)}")
        if role == "system" and i:
            raise fail(f"message {i} is a system turn after the first message", "put the system turn first")
        if not content.strip():
            raise fail(f"message {i} ({role}) has empty content", "drop the message or give it text")
        try:  # JSON's \ud800 escapes decode to lone surrogates, which no encoder (or parquet) accepts
            content.encode("utf-8")
        except UnicodeEncodeError as e:
            raise fail(f"message {i} ({role}) is not valid Unicode (lone surrogate {content[e.start]!r} at "
                       f"character {e.start})", "fix the \\u escape in the file") from None
        turns.append((role, content))
    if need_assistant and not any(r == "assistant" for r, _ in turns):
        raise fail("the conversation has no assistant turn, so there is nothing to train on",
                   "add an assistant reply, or leave the conversation out")
    return turns


def render(enc: tiktoken.Encoding, turns: Sequence[tuple[str, str]], *,
           mask: bool = False) -> np.ndarray | tuple[np.ndarray, np.ndarray]:
    """The ids of a conversation: BOS, then each (role, text) turn between its role's markers.
    With `mask`, also a bool array, True where the position's token is trained on (assistant
    text and <|assistant_end|>)."""
    ids = [enc.encode_single_token(BOS)]
    keep = [False]
    for role, text in turns:
        if role not in ROLES:
            raise ChatError(f"unknown chat role {role!r} (expected one of {', '.join(ROLES)})")
        body = enc.encode_ordinary(text)
        ids.append(enc.encode_single_token(f"<|{role}_start|>"))
        ids.extend(body)
        ids.append(enc.encode_single_token(f"<|{role}_end|>"))
        trained = role == "assistant"
        keep.extend([False] + [trained] * (len(body) + 1))
    out = np.asarray(ids, dtype=np.int64)
    return (out, np.asarray(keep, dtype=bool)) if mask else out


def prompt_ids(enc: tiktoken.Encoding, turns: Sequence[tuple[str, str]]) -> list[int]:
    """The ids to generate the next assistant reply from: the conversation, then <|assistant_start|>."""
    return [*render(enc, turns).tolist(), enc.encode_single_token(ASSISTANT_START)]  # type: ignore[union-attr]


def qa_turns(text: str) -> Turns | None:
    """A "Question: ... Answer: ..." document as [(user, question), (assistant, answer)];
    None if the document is not in that form."""
    if not text.startswith(QUESTION) or ANSWER not in text:
        return None
    q, a = text[len(QUESTION):].split(ANSWER, 1)
    q, a = q.strip(), a.strip()
    return [("user", q), ("assistant", a)] if q and a else None
