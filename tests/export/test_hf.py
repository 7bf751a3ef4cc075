"""The Hugging Face export: transformers loads it with no custom code and computes what we compute."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.engine import encode_prompt
from lmforge.errors import InputError
from lmforge.export.hf import load_any, parity, write_hf
from lmforge.model import GPT, ModelConfig
from lmforge.weights import save_model, state_for_save

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def trained_like(vocab: int, *, qk_norm: bool = False, tied: bool = False, seed: int = 0) -> GPT:
    """Random weights with every matrix N(0, 1/fan_in), so every layer moves the logits."""
    torch.manual_seed(seed)
    model = GPT(ModelConfig(vocab_size=vocab, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16,
                            d_mlp=128, max_seq_len=96, qk_norm=qk_norm, tie_embeddings=tied, rope_theta=500.0))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed_tokens" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif p.ndim == 1:
                p.uniform_(0.5, 1.5)  # norms away from one, so a missed norm shows
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.tokenizer import TokenizerConfig, save, train

    texts = [f"Question {i}: what is {i} plus {i + 3}? Answer: {2 * i + 3}. The capital of France is Paris."
             for i in range(300)]
    return save(train(texts, TokenizerConfig(vocab_size=400)), tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def vocab(tokenizer_dir: Path) -> int:
    """The tokenizer's real vocabulary (a small corpus stops BPE short of the 400 asked for)."""
    from lmforge.tokenizer import load_encoder

    return load_encoder(tokenizer_dir).n_vocab


def prompts(tokenizer_dir: Path) -> list[list[int]]:
    from lmforge.chat import prompt_ids
    from lmforge.tokenizer import load_encoder

    enc = load_encoder(tokenizer_dir)
    return [encode_prompt(enc, "The capital of France is"), encode_prompt(enc, "Question 7: what"),
            prompt_ids(enc, [("user", "what is 2 plus 5?")])]


@pytest.mark.parametrize(("qk_norm", "tied"), [(False, False), (True, True)], ids=["llama", "qwen3-tied"])
def test_transformers_loads_the_export_and_matches_our_logits_and_greedy_tokens(
        tokenizer_dir: Path, vocab: int, tmp_path: Path, qk_norm: bool, tied: bool) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = trained_like(vocab, qk_norm=qk_norm, tied=tied)
    config = write_hf(model, tokenizer_dir, tmp_path / "hf")
    assert config["model_type"] == ("qwen3" if qk_norm else "llama")
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))  # no trust_remote_code: a standard class
    assert type(hf).__name__ == ("Qwen3ForCausalLM" if qk_norm else "LlamaForCausalLM")
    p = parity(model, tmp_path / "hf", prompts(tokenizer_dir), n_tokens=32)
    assert p["max_abs_logit_diff"] <= 1e-4 and p["greedy_same"] and p["greedy_same_prompts"] == 3, p
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert tok.eos_token == "<|assistant_end|>" and tok.bos_token == "<|bos|>"


def test_chat_template_renders_our_chat_format(
        tokenizer_dir: Path, vocab: int, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from lmforge.chat import prompt_ids
    from lmforge.tokenizer import load_encoder

    write_hf(trained_like(vocab), tokenizer_dir, tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    turns = [("system", "Be brief."), ("user", "what is 2 plus 5?"), ("assistant", "7"), ("user", "and 3 plus 4?")]
    ids = tok.apply_chat_template([{"role": r, "content": c} for r, c in turns], add_generation_prompt=True,
                                  tokenize=True, return_dict=False)
    assert list(ids) == prompt_ids(load_encoder(tokenizer_dir), turns)


def test_generation_config_stops_where_lmforge_stops(
        tokenizer_dir: Path, vocab: int, tmp_path: Path) -> None:
    from lmforge.engine import DEFAULT_STOPS

    write_hf(trained_like(vocab), tokenizer_dir, tmp_path / "hf")
    gen = json.loads((tmp_path / "hf/generation_config.json").read_text())
    assert set(gen["eos_token_id"]) == set(DEFAULT_STOPS) and gen["bos_token_id"] == 0


def test_lmforge_generate_and_transformers_generate_agree_on_32_greedy_tokens(
        tokenizer_dir: Path, vocab: int, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`lmforge generate` on our model directory vs transformers' `generate` on its export,
    each with its own defaults for stopping (the same stop tokens) and the same prompt."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lmforge.cli import main

    model = trained_like(vocab, seed=3)
    save_model(model, tmp_path / "ours", tokenizer_dir=tokenizer_dir)
    write_hf(model, tokenizer_dir, tmp_path / "hf")
    text = "The capital of France is"
    assert main(["generate", "--model", str(tmp_path / "ours"), "--prompt", text, "--greedy",
                 "--max-new-tokens", "32"]) == 0
    ours = capsys.readouterr().out.removesuffix("\n")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf"))
    x = tok(text, return_tensors="pt")  # adds <|bos|> as our encode_prompt does
    out = hf.generate(**x, do_sample=False, max_new_tokens=32)[0, x["input_ids"].shape[1]:].tolist()
    stops = set(hf.generation_config.eos_token_id)
    new = [t for i, t in enumerate(out) if not any(s in stops for s in out[:i + 1])]
    assert len(new) == 32 and tok.decode(new) == ours  # no stop token came up: all 32 compared


def test_load_any_reads_the_export_and_our_directories_back(
        tokenizer_dir: Path, vocab: int, tmp_path: Path) -> None:
    model = trained_like(vocab, qk_norm=True, tied=True)
    write_hf(model, tokenizer_dir, tmp_path / "hf")
    save_model(model, tmp_path / "ours", tokenizer_dir=tokenizer_dir)
    for d in ("hf", "ours"):
        back, enc, _ = load_any(tmp_path / d)
        assert back.config == model.config and enc.n_vocab == vocab
        for (k, a), (k2, b) in zip(state_for_save(back).items(), state_for_save(model).items(), strict=True):
            assert k == k2 and torch.equal(a, b), k


def test_load_any_names_the_file_and_the_problem(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(InputError, match=r"config\.json: model_type 'gpt2' is not one lmforge reads"):
        load_any(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match=r"config\.json:1: invalid JSON"):
        load_any(tmp_path)
    with pytest.raises(InputError, match=r"config\.json: not found \(fix: point at a model directory"):
        load_any(tmp_path / "missing")


def test_writing_twice_gives_the_same_bytes(
        tokenizer_dir: Path, vocab: int, tmp_path: Path) -> None:
    from lmforge.digest import sha256_path

    model = trained_like(vocab)
    write_hf(model, tokenizer_dir, tmp_path / "a")
    write_hf(model, tokenizer_dir, tmp_path / "b")
    assert sha256_path(tmp_path / "a") == sha256_path(tmp_path / "b")
