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


# --- lmforge chat ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_model(tok_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch

    from lmforge.model import GPT, ModelConfig
    from lmforge.weights import save_model

    torch.manual_seed(0)
    enc = load_encoder(tok_dir)
    cfg = ModelConfig.from_depth(2, enc.n_vocab, head_dim=16, aspect_ratio=16, max_seq_len=96)
    out = tmp_path_factory.mktemp("m") / "model"
    save_model(GPT(cfg), out, tokenizer_dir=tok_dir)
    return out


def _chat(model: Path, text: str, *extra: str) -> str:
    import io

    from lmforge.cli import build_parser

    args = build_parser().parse_args(["chat", "--model", str(model), "--max-new-tokens", "12", *extra])
    out = io.StringIO()
    assert args.func.__module__ == "lmforge.chat_cli"
    from lmforge.chat_cli import chat

    assert chat(args, io.StringIO(text), out) == 0
    return out.getvalue()


def test_chat_streams_one_reply_per_message_reproducibly(chat_model: Path) -> None:
    text = "What is 2 + 3?\n\nAnd 4 + 4?\n/reset\nHello\n"
    a = _chat(chat_model, text, "--seed", "3")
    assert a == _chat(chat_model, text, "--seed", "3")
    assert a != _chat(chat_model, text, "--seed", "4")
    # the first reply is written before the next line is read; after /reset (the blank line
    # makes no reply) the third reply (seed 3 + 2) is that of a fresh conversation
    assert a.startswith(_chat(chat_model, "What is 2 + 3?\n", "--seed", "3"))
    assert a.endswith(_chat(chat_model, "Hello\n", "--seed", "5"))
    greedy = _chat(chat_model, "What is 2 + 3?\n", "--temperature", "0")
    assert greedy == _chat(chat_model, "What is 2 + 3?\n/exit\nignored\n", "--temperature", "0")


def test_long_conversations_drop_the_oldest_turns(chat_model: Path) -> None:
    from lmforge.chat_cli import fit_context

    turns = [("system", "s"), ("user", "a"), ("assistant", "b"), ("user", "c")]
    assert fit_context(turns, 50, 64, 10) is turns
    assert fit_context(turns, 60, 64, 10) == [("system", "s"), ("user", "c")]
    # twelve messages of ~10 tokens and replies of 12 overflow the 96-token context: no error
    assert _chat(chat_model, "".join(f"message {i} with some more words in it\n" for i in range(12)),
                 "--seed", "0", "--system", "Be brief.")


def test_chat_refuses_a_model_without_a_chat_template(chat_model: Path, tmp_path: Path) -> None:
    import json
    import shutil

    from lmforge.errors import InputError

    bare = tmp_path / "model"
    shutil.copytree(chat_model, bare)
    cfg_path = bare / "tokenizer" / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["chat_template"]
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(InputError, match="no chat template"):
        _chat(bare, "hi\n")


def test_chat_cli_runs_as_a_process(chat_model: Path) -> None:
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-m", "lmforge.cli", "chat", "--model", str(chat_model), "--seed", "1",
                           "--max-new-tokens", "8"], input="What is 1 + 1?\n", capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.endswith("\n") and len(proc.stdout) > 1
