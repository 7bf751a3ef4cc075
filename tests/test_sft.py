"""SFT data: conversation sets, splits by prompt hash, the masked loader, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from lmforge.chat import ChatError, render
from lmforge.config import build as build_config
from lmforge.data.chats import (
    ChatSet,
    Conversation,
    assert_disjoint,
    build,
    from_table,
    prompt_key,
    split_of,
    table,
)
from lmforge.data.mathgen import extract_answer
from lmforge.errors import ConfigError, InputError, LmforgeError
from lmforge.sft import SFTConfig, chat_split, exact_match
from lmforge.train.data import PackedRows

SETS = [ChatSet(name="w", kind="math_word", n=40), ChatSet(name="a", kind="math_arithmetic", n=40),
        ChatSet(name="d", kind="drill", n=200, max_operand=20)]


@pytest.fixture(scope="module")
def enc(math_encoder):  # type: ignore[no-untyped-def]
    return math_encoder


def test_built_sets_are_deterministic_graded_and_valid() -> None:
    a, b = build(SETS, 3), build(SETS, 3)
    assert a == b and a != build(SETS, 4)
    for c in a:
        assert c.turns[0][0] == "user" and c.turns[-1][0] == "assistant"
        assert extract_answer(c.turns[-1][1]) == c.answer  # every worked solution ends in its answer
    df = table(a, 0.2)
    assert from_table(df) == a


def test_split_is_a_function_of_the_prompt_alone() -> None:
    convs = build(SETS, 5)
    df = table(convs, 0.25)
    for c, s in zip(convs, df["split"], strict=True):
        assert s == split_of(c.key, 0.25)
    # the same prompt from another set, another seed or with other whitespace: the same key
    twin = Conversation("x", "x", [("user", "  " + convs[0].turns[0][1].replace(" ", "  ")), ("assistant", "?")])
    assert twin.key == convs[0].key
    assert 0.1 < (df["split"] == "heldout").mean() < 0.4


def test_train_and_heldout_never_share_a_prompt() -> None:
    convs = build(SETS, 6)
    df = table(convs, 0.3)
    train_, held = from_table(df[df.split == "train"]), from_table(df[df.split == "heldout"])
    assert assert_disjoint(train_, held) == len({c.key for c in held})
    with pytest.raises(LmforgeError, match="both in train and held-out"):
        assert_disjoint(train_ + held[:1], held)


def test_masked_loader_trains_only_assistant_tokens(enc) -> None:  # type: ignore[no-untyped-def]
    convs = build(SETS, 2)
    split, mask = chat_split(enc, convs)
    assert int(mask.sum()) == sum(int(render(enc, c.turns, mask=True)[1].sum()) for c in convs)
    loader = PackedRows(split, 64, seed=0, mask=mask)
    for batch in loader.next_step(8, 4):
        x, y = batch["inputs"].numpy(), batch["targets"].numpy()
        assert (x >= 0).all()  # inputs are whole, masked tokens included
        kept = y != -1
        assert kept.any() and not kept.all()
        # a kept target is the next input token; every kept token is an assistant token
        np.testing.assert_array_equal(y[:, :-1][kept[:, :-1]], x[:, 1:][kept[:, :-1]])
    rows, keep = PackedRows(split, 64, seed=0, mask=mask).take_masked(8)
    assert keep is not None and keep.shape == rows.shape and keep.dtype == bool


def test_exact_match_grades_the_final_answer() -> None:
    probs = [Conversation("p", "d", [("user", "What is 2 + 3?"), ("assistant", "2 + 3 = 5\n#### 5")], 5)]
    assert exact_match([["2 + 3 = 5\n#### 5", "#### 6", "five"]], probs) == [[True, False, False]]


def _jsonl(path: Path, lines: list[object]) -> Path:
    path.write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    return path


GOOD = {"messages": [{"role": "user", "content": "Hi?"}, {"role": "assistant", "content": "Hello."}]}


def test_users_jsonl_and_local_hf_datasets_load_through_the_same_path(tmp_path: Path) -> None:
    f = _jsonl(tmp_path / "mine.jsonl", [GOOD, {"messages": [{"role": "system", "content": "Be brief."}, *GOOD["messages"]]}])
    (tmp_path / "hf").mkdir()
    _jsonl(tmp_path / "hf" / "train.jsonl", [GOOD] * 3)
    convs = build([ChatSet(name="mine", kind="jsonl", path=str(f)),
                   ChatSet(name="hub", kind="hf", path=str(tmp_path / "hf"), split="train", n=2)], 0)
    assert [c.id for c in convs] == ["mine-1", "mine-2", "hub-0", "hub-1"]
    assert convs[1].turns[0] == ("system", "Be brief.") and convs[2].turns == convs[0].turns
    assert prompt_key(convs[0].turns) == prompt_key(convs[2].turns)


@pytest.mark.parametrize(("line", "error", "needle"), [
    ({"messages": [{"role": "user", "content": "Hi?"}]}, ChatError, "no assistant turn"),
    ({"messages": [{"role": "user", "content": "Hi?"}, {"role": "robot", "content": "beep"}]}, ChatError,
     "unknown role 'robot'"),
    ({"text": "Hi?"}, InputError, "missing field 'messages'"),
])
def test_bad_conversations_name_the_file_and_line(tmp_path: Path, line: object, error: type, needle: str) -> None:
    f = _jsonl(tmp_path / "bad.jsonl", [GOOD, line])
    with pytest.raises(error, match=needle) as e:
        build([ChatSet(name="mine", kind="jsonl", path=str(f))], 0)
    assert f"{f}:2" in str(e.value)


def test_bad_sets_are_config_errors() -> None:
    with pytest.raises(ValueError, match="needs n >= 1"):
        ChatSet(name="d", kind="drill")
    with pytest.raises(ValueError, match="needs a path"):
        ChatSet(name="f", kind="jsonl")
    with pytest.raises(LmforgeError, match="unique"):
        build([ChatSet(name="d", kind="drill", n=1)] * 2, 0)
    with pytest.raises(ConfigError, match=r"sft.data.pretrain_fraction: must be in \[0, 1\) \(got 1.0\)"):
        build_config(SFTConfig, {"data": {"sets": [{"name": "d", "kind": "drill", "n": 1}], "pretrain_fraction": 1.0},
                                 "train": {"steps": 1}}, "params.yaml: sft")


def test_rst_faq_sections_become_conversations(tmp_path: Path) -> None:
    doc = ("Intro\n=====\n\nSome prose.\n\n"
           "Why is the sky blue?\n--------------------\n\nBecause air scatters blue light more than red light, "
           "by Rayleigh scattering.\n\nA second paragraph.\n\n"
           "Is that all?\n------------\n\nSee the next question.\n\n"
           "How do I cite it?\n^^^^^^^^^^^^^^^^^\n\nWith a reference to the physics of scattering, in full.\n\n"
           "Next title\n----------\n\nNot an answer.\n")
    f = _jsonl(tmp_path / "docs.jsonl", [{"id": "d", "text": doc}])
    convs = build([ChatSet(name="faq", kind="rst_faq", path=str(f))], 0)
    assert [c.turns[0][1] for c in convs] == ["Why is the sky blue?", "How do I cite it?"]
    assert convs[0].turns[1][1].endswith("A second paragraph.")
    assert convs[1].turns[1][1] == "With a reference to the physics of scattering, in full."
    short = build([ChatSet(name="faq", kind="rst_faq", path=str(f), max_chars=60)], 0)
    assert short[0].turns[1][1].startswith("Because") and "second" not in short[0].turns[1][1]
    with pytest.raises(InputError, match="no question sections"):
        none = _jsonl(tmp_path / "none.jsonl", [{"text": "Prose."}])
        build([ChatSet(name="faq", kind="rst_faq", path=str(none))], 0)
