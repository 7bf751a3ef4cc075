"""The chat format: rendering, the loss mask, the HF chat template, and bad conversations."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.chat import ChatError, check, prompt_ids, qa_turns, render
from lmforge.data import mathgen
from lmforge.tokenizer import TokenizerConfig, load_encoder, save, train

TEXTS = [mathgen.format_document(r) for r in mathgen.generate(300, 5)] + [
    "What does the word harbour mean? A sheltered place where ships are kept safe.",
    "Ünïcödé text, tabs\tand  double  spaces, and a <|user_start|> that is only text.",
]

CONVERSATIONS = [
    [{"role": "user", "content": "What is 12 + 30?"}, {"role": "assistant", "content": "12 + 30 = 42\n#### 42"}],
    [{"role": "system", "content": "You answer in one line."},
     {"role": "user", "content": "Name a harbour."},
     {"role": "assistant", "content": "Dover."},
     {"role": "user", "content": "  And another, with  spaces?\n"},
     {"role": "assistant", "content": " Calais, across the <|assistant_end|> strait."}],
]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    save(train(TEXTS * 3, TokenizerConfig(vocab_size=600)), out)
    return out


def test_mask_covers_exactly_the_assistant_tokens(tok_dir: Path) -> None:
    enc = load_encoder(tok_dir)
    for messages in CONVERSATIONS:
        turns = check(messages, "test")
        ids, mask = render(enc, turns, mask=True)
        assert len(ids) == len(mask)
        # rebuild the expected mask turn by turn from the markers
        end = enc.encode_single_token("<|assistant_end|>")
        trained = [int(t) for t, m in zip(ids, mask, strict=True) if m]
        expected = []
        for role, text in turns:
            if role == "assistant":
                expected += [*enc.encode_ordinary(text), end]
        assert trained == expected
        # every masked-out position is BOS, a marker, or system / user text
        assert enc.decode([int(t) for t, m in zip(ids, mask, strict=True) if not m]) == "<|bos|>" + "".join(
            f"<|{r}_start|>" + (t if r != "assistant" else "") + (f"<|{r}_end|>" if r != "assistant" else "")
            for r, t in turns)


def test_special_strings_inside_content_stay_text(tok_dir: Path) -> None:
    enc = load_encoder(tok_dir)
    ids = render(enc, check(CONVERSATIONS[1], "test"))
    end = enc.encode_single_token("<|assistant_end|>")
    assert list(ids).count(end) == 2  # the two real turns, not the one written in the text


def test_apply_chat_template_gives_the_same_ids(tok_dir: Path) -> None:
    """For content free of special-token strings (transformers parses those as markers, we as
    text: the one documented difference)."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dir)
    enc = load_encoder(tok_dir)
    plain = [[{**m, "content": m["content"].replace("<|assistant_end|>", "")} for m in c] for c in CONVERSATIONS]
    for messages in plain:
        turns = check(messages, "test")
        ours = render(enc, turns).tolist()
        theirs = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
        assert list(theirs) == ours
        gen = hf.apply_chat_template(messages[:-1], tokenize=True, add_generation_prompt=True, return_dict=False)
        assert list(gen) == prompt_ids(enc, turns[:-1])


@pytest.mark.parametrize(("messages", "needle"), [
    ([{"role": "user", "content": "hi"}], "no assistant turn"),
    ([{"role": "user", "content": "hi"}, {"role": "bot", "content": "hello"}], "unknown role 'bot'"),
    ([{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}, {"role": "assistant", "content": "y"}],
     "system turn after the first"),
    ([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "  "}], "empty content"),
    ([{"role": "user", "text": "hi"}], "string 'role' and 'content'"),
    ("hello", "non-empty list"),
    ([], "non-empty list"),
])
def test_bad_conversations_name_the_record(messages: object, needle: str) -> None:
    with pytest.raises(ChatError, match=needle) as e:
        check(messages, "convs.jsonl:7")
    assert str(e.value).startswith("convs.jsonl:7: ") and "(fix: " in str(e.value)


def test_qa_documents_become_two_turns() -> None:
    assert qa_turns("Question: What is 2 + 2?\nAnswer: 2 + 2 = 4\n#### 4") == [
        ("user", "What is 2 + 2?"), ("assistant", "2 + 2 = 4\n#### 4")]
    assert qa_turns("Some prose.") is None
