"""Tests of lmforge.engine and `lmforge generate`: `pytest tests/test_engine.py`.

Small random models whose output projections and head get noise on top of the init (which
zeroes o_proj / down_proj), so greedy decoding is not one token repeated. The central check:
generation with the KV cache equals recomputing the whole sequence, token for token, also for
left-padded batches, grouped-query attention and QK-norm.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lmforge.engine import DEFAULT_STOPS, GenerationError, complete, generate, steps
from lmforge.model import GPT, ModelConfig
from lmforge.tokenizer import BOS_ID, TokenizerConfig, load_encoder, save, train
from lmforge.weights import save_model

ROOT = Path(__file__).resolve().parent.parent
TEXT = ("The quick brown fox jumps over the lazy dog. A stitch in time saves nine. "
        "To be, or not to be, that is the question. 0123456789 ") * 20
PROMPTS = [[BOS_ID, 5, 300, 41], [BOS_ID, 99], [BOS_ID, 7, 8, 9, 10, 11, 12], [BOS_ID, 99]]


def noisy_model(vocab: int = 512, seed: int = 0, **overrides: object) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig.from_depth(2, vocab, aspect_ratio=32, head_dim=16, max_seq_len=64, **overrides)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")) or (
                    name == "lm_head.weight" and not cfg.tie_embeddings):
                p.normal_(std=2 * p.shape[1] ** -0.5)
    return model.eval()


def assert_cache_matches(model: GPT, prompts: list[list[int]], n: int = 40) -> list[list[int]]:
    cached = generate(model, prompts, n, temperature=0)
    assert cached == generate(model, prompts, n, temperature=0, use_cache=False)
    assert all(len(row) == n for row in cached)
    assert all(len(set(row)) > 3 for row in cached), "greedy output is degenerate; the test proves nothing"
    return cached


def test_cache_equals_no_cache_single_prompt() -> None:
    assert_cache_matches(noisy_model(), PROMPTS[:1])


def test_cache_equals_no_cache_left_padded_batch() -> None:
    model = noisy_model()
    batch = assert_cache_matches(model, PROMPTS)
    assert batch[1] == batch[3]  # identical prompts, different neighbours
    # each row of the padded batch is what that prompt gives alone
    assert [generate(model, [p], 40, temperature=0)[0] for p in PROMPTS] == batch


@pytest.mark.parametrize("overrides", [{"kv_ratio": 2}, {"qk_norm": True}, {"kv_ratio": 4, "qk_norm": True},
                                       {"tie_embeddings": True}], ids=["gqa", "qk_norm", "gqa_qk_norm", "tied"])
def test_cache_equals_no_cache_variants(overrides: dict[str, object]) -> None:
    model = noisy_model(**overrides)
    if "kv_ratio" in overrides:
        assert model.config.n_kv_head < model.config.n_head
    assert_cache_matches(model, PROMPTS)


def test_seeded_sampling_is_reproducible() -> None:
    model = noisy_model()
    kw = {"temperature": 1.0, "top_k": 50, "top_p": 0.9}
    first = generate(model, PROMPTS, 30, seed=7, **kw)
    assert first == generate(model, PROMPTS, 30, seed=7, **kw)
    assert first == generate(model, PROMPTS, 30, seed=7, use_cache=False, **kw)
    assert first != generate(model, PROMPTS, 30, seed=8, **kw)
    assert first != generate(model, PROMPTS, 30, temperature=0)


def test_top_k_1_and_tiny_top_p_are_greedy() -> None:
    model = noisy_model()
    greedy = generate(model, PROMPTS, 30, temperature=0)
    assert generate(model, PROMPTS, 30, temperature=1.5, top_k=1, seed=3) == greedy
    assert generate(model, PROMPTS, 30, temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_stop_tokens_end_each_row() -> None:
    model = noisy_model()
    greedy = generate(model, PROMPTS, 30, temperature=0)
    stop = greedy[0][5]
    out = generate(model, PROMPTS, 30, temperature=0, stop_tokens=[stop])
    for full, row in zip(greedy, out, strict=True):
        cut = full.index(stop) if stop in full else len(full)
        assert row == full[:cut]
    assert len(out[0]) == greedy[0].index(stop) <= 5


def test_vocab_size_limits_sampling() -> None:
    out = generate(noisy_model(), PROMPTS, 30, seed=0, vocab_size=20)
    assert all(0 <= t < 20 for row in out for t in row)


def test_logprobs_are_the_untempered_model_log_softmax() -> None:
    """`steps(logprobs=True)` adds each token's log-probability under the raw logits (the whole
    vocabulary, no temperature or filtering) and samples exactly the same tokens."""
    model = noisy_model()
    kw = {"temperature": 1.5, "top_k": 40, "seed": 4, "vocab_size": 500}
    scored = list(steps(model, PROMPTS, 12, logprobs=True, **kw))
    assert [(row, token) for row, token, _ in scored] == list(steps(model, PROMPTS, 12, **kw))
    for row, prompt in enumerate(PROMPTS):
        new = [token for r, token, _ in scored if r == row]
        with torch.no_grad():
            full = model(torch.tensor([prompt + new]))[0].float().log_softmax(-1)
        expect = [full[len(prompt) - 1 + i, token].item() for i, token in enumerate(new)]
        assert [lp for r, _, lp in scored if r == row] == pytest.approx(expect, abs=1e-5)


def test_bad_arguments_are_clear_errors() -> None:
    model = noisy_model()  # max_seq_len 64
    assert len(generate(model, [[BOS_ID] * 4], 60, temperature=0)[0]) == 60  # exactly fits
    with pytest.raises(GenerationError, match="exceeds the model's max_seq_len 64"):
        generate(model, [[BOS_ID] * 5, [BOS_ID]], 60)
    with pytest.raises(GenerationError, match="at least one token"):
        generate(model, [[]], 4)
    with pytest.raises(GenerationError, match="outside the model's vocabulary"):
        generate(model, [[BOS_ID, 512]], 4)
    with pytest.raises(GenerationError, match="top_p"):
        generate(model, [[BOS_ID]], 4, top_p=0)
    assert generate(model, [[BOS_ID], [BOS_ID, 3]], 0) == [[], []]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("engine")
    save(train([TEXT], TokenizerConfig(vocab_size=300)), root / "tokenizer")
    save_model(noisy_model(vocab=320), root / "model", tokenizer_dir=root / "tokenizer")  # vocab padded past 300
    return root / "model"


def lmforge(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "lib"), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "lmforge.cli", *args], capture_output=True, text=True,
                          env=env, timeout=120)


def test_complete_and_cli_greedy_agree(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main
    from lmforge.weights import load_model, tokenizer_path

    model, _ = load_model(model_dir)
    enc = load_encoder(tokenizer_path(model_dir))
    text = complete(model, enc, "The quick", 20, temperature=0)
    ids = generate(model, [[BOS_ID, *enc.encode_ordinary("The quick")]], 20, temperature=0,
                   stop_tokens=DEFAULT_STOPS, vocab_size=enc.n_vocab)[0]
    assert isinstance(text, str) and text == enc.decode(ids)
    assert main(["generate", "--model", str(model_dir), "--prompt", "The quick", "--greedy",
                 "--max-new-tokens", "20", "--device", "cpu"]) == 0
    assert capsys.readouterr().out == text + "\n"


def test_cli_generate_end_to_end(model_dir: Path) -> None:
    run = lmforge("generate", "--model", str(model_dir), "--prompt", "To be", "--seed", "1",
                  "--top-k", "40", "--num-samples", "2", "--max-new-tokens", "8")
    assert run.returncode == 0, run.stderr
    assert run.stdout.count("--- sample ") == 2 and len(run.stdout.splitlines()) > 2


def test_cli_generate_errors(model_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from lmforge.cli import main

    assert main(["generate", "--model", str(tmp_path / "nowhere"), "--prompt", "x"]) == 2
    assert "config.json: not found" in capsys.readouterr().err
    assert main(["generate", "--model", str(model_dir), "--prompt", "x", "--max-new-tokens", "1000"]) == 2
    assert "exceeds the model's max_seq_len" in capsys.readouterr().err

    broken = tmp_path / "model"
    broken.mkdir()
    for f in model_dir.iterdir():
        if f.is_file():
            (broken / f.name).write_bytes(f.read_bytes())
    (broken / "tokenizer").symlink_to(model_dir / "tokenizer")
    weights = bytearray((broken / "model.safetensors").read_bytes())
    weights[len(weights) // 2] ^= 0xFF
    (broken / "model.safetensors").write_bytes(bytes(weights))
    damaged = lmforge("generate", "--model", str(broken), "--prompt", "x")
    assert damaged.returncode == 2, damaged.stderr
    assert f"{broken / 'model.safetensors'}: sha256 does not match" in damaged.stderr
    assert "Traceback" not in damaged.stderr
