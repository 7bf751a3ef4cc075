"""Verifiable rewards for math replies: the exact final answer, and a small reward for the format.

A reply earns 1 when its final `#### N` line equals the problem's exact answer (mathgen's
`extract_answer`, the same rule as held-out grading), plus `format_weight` when it ends in a
well-formed `#### N` line at all, right or wrong.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..data.mathgen import extract_answer


def reward(reply: str, answer: int, *, format_weight: float) -> float:
    got = extract_answer(reply)
    return float(got == answer) + (format_weight if got is not None else 0.0)


def rewards(replies: Sequence[str], answers: Sequence[int], *, format_weight: float) -> list[float]:
    return [reward(r, a, format_weight=format_weight) for r, a in zip(replies, answers, strict=True)]
