"""GGUF export: round trips through gguf's own reader, llama.cpp's layout, the tokenizer, errors.

Tiny random models (every matrix N(0, 1/fan_in), so every layer moves the logits) over a real
byte-level BPE tokenizer trained here on a few hundred strings.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from lmforge.errors import InputError, LmforgeError
from lmforge.export.gguf import _permute, compare, gguf_name, read_gguf, write_gguf
from lmforge.model import GPT, ModelConfig, rope_tables
from lmforge.tokenizer import (
    BOS_ID,
    CHAT_TEMPLATE,
    TokenizerConfig,
    load,
    save,
    special_id,
    train,
    vocab_size,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

WORDS = ["the", "cat", "sat", "on", "a", "mat", "and", "dog", "ran", "to", "its", "red", "ball", "while", "birds",
         "sang", "over", "12", "green", "hills", "It's", "a", "day", "we'll", "REMEMBER"]


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) + rng.choice([".", "!", "?\n"])
             for _ in range(400)]
    return save(train(texts, TokenizerConfig(vocab_size=300)), tmp_path_factory.mktemp("gguf") / "tokenizer")


@pytest.fixture(scope="module")
def n_tok(tok_dir: Path) -> int:
    return vocab_size(load(tok_dir))


def tiny(vocab: int, *, qk_norm: bool = False, tie: bool = False, n_head: int = 2, n_kv_head: int = 1,
         seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=vocab, n_layer=2, d_model=16 * n_head, n_head=n_head, n_kv_head=n_kv_head,
                      head_dim=16, d_mlp=64, max_seq_len=64, qk_norm=qk_norm, tie_embeddings=tie,
                      rope_theta=500000.0, norm_eps=1e-5)
    model = GPT(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed_tokens" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
            elif p.ndim == 1:  # norms away from 1, so a swapped or permuted norm would show
                p.uniform_(0.5, 1.5)
    return model.eval()


def raw_tensors(path: Path) -> dict[str, tuple[str, np.ndarray]]:
    reader = gguf.GGUFReader(path)
    return {t.name: (t.tensor_type.name, np.array(t.data)) for t in reader.tensors}


def test_f32_round_trip_llama_is_exact(tmp_path: Path, tok_dir: Path, n_tok: int) -> None:
    model = tiny(n_tok)
    summary = write_gguf(model, tok_dir, tmp_path / "m.gguf", dtype="f32")
    assert summary["arch"] == "llama" and summary["n_tensors"] == 2 * 9 + 3
    assert summary["tensor_types"] == {"F32": 21} and summary["bytes"] == (tmp_path / "m.gguf").stat().st_size
    cfg, state, meta = read_gguf(tmp_path / "m.gguf")
    assert cfg == model.config and meta["general.architecture"] == "llama"
    assert meta["llama.rope.dimension_count"] == 16 and meta["llama.attention.key_length"] == 16
    ours = model.state_dict()
    assert list(state) == list(ours)
    assert all(torch.equal(state[k], ours[k]) for k in ours)
    # what llama.cpp reads: q and k rows permuted (not v), names its own
    raw = raw_tensors(tmp_path / "m.gguf")
    q = ours["model.layers.0.self_attn.q_proj.weight"]
    assert not np.array_equal(raw["blk.0.attn_q.weight"][1], q.numpy())
    assert np.array_equal(raw["blk.0.attn_q.weight"][1], _permute(q, 2).numpy())
    assert np.array_equal(raw["blk.0.attn_k.weight"][1], _permute(ours["model.layers.0.self_attn.k_proj.weight"], 1))
    assert np.array_equal(raw["blk.0.attn_v.weight"][1], ours["model.layers.0.self_attn.v_proj.weight"].numpy())
    assert "output.weight" in raw and "blk.0.attn_q_norm.weight" not in raw
    report = compare(model, tmp_path / "m.gguf")
    assert report["n_identical"] == report["n_tensors"] == 21 and report["max_abs_diff"] == 0.0
    assert report["config_equal"] and report["n_prompts_same_tokens"] == report["n_prompts"] == 4


def test_f32_round_trip_qwen3_tied_is_exact(tmp_path: Path, tok_dir: Path, n_tok: int) -> None:
    model = tiny(n_tok, qk_norm=True, tie=True, n_head=4, n_kv_head=2, seed=1)
    summary = write_gguf(model, tok_dir, tmp_path / "m.gguf", dtype="f32")
    assert summary["arch"] == "qwen3" and summary["n_tensors"] == 2 * 11 + 2
    cfg, state, meta = read_gguf(tmp_path / "m.gguf")
    assert cfg == model.config and cfg.tie_embeddings and cfg.qk_norm
    assert "lm_head.weight" not in state and "qwen3.rope.dimension_count" not in meta
    ours = model.state_dict()
    assert all(torch.equal(state[k], ours[k]) for k in state)
    raw = raw_tensors(tmp_path / "m.gguf")
    assert "output.weight" not in raw and "blk.1.attn_k_norm.weight" in raw
    # NeoX rope in llama.cpp's qwen3: no permutation
    assert np.array_equal(raw["blk.0.attn_q.weight"][1], ours["model.layers.0.self_attn.q_proj.weight"].numpy())
    report = compare(model, tmp_path / "m.gguf")
    assert report["n_identical"] == 24 and all(report["same_tokens"])


def test_permutation_turns_rotate_half_into_interleaved_rope() -> None:
    """Interleaved rope (llama.cpp's `llama`: pairs 2i, 2i+1) on permuted q equals the permuted
    rotate-half rope (ours, Hugging Face's: pairs i, i + D/2) on ours, so attention scores agree."""
    n_head, hd, d, T = 2, 8, 16, 5
    torch.manual_seed(0)
    w, x = torch.randn(n_head * hd, d), torch.randn(T, d)
    cos, sin = rope_tables(hd, T, 10000.0)  # (T, hd/2)

    q = (x @ w.t()).view(T, n_head, hd)
    a, b = q[..., : hd // 2], q[..., hd // 2:]
    c, s = cos[:, None], sin[:, None]
    ours = torch.cat([a * c - b * s, b * c + a * s], -1)

    qp = (x @ _permute(w, n_head).t()).view(T, n_head, hd)
    e, o = qp[..., 0::2], qp[..., 1::2]
    theirs = torch.stack([e * c - o * s, o * c + e * s], -1).reshape(T, n_head, hd)

    expected = (_permute(ours.reshape(T, n_head * hd).t(), n_head).t()).reshape(T, n_head, hd)
    torch.testing.assert_close(theirs, expected)


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_f16_and_q8_0_round_trip(tmp_path: Path, tok_dir: Path, n_tok: int, dtype: str) -> None:
    # d_model 48: rows of that length are not whole Q8_0 blocks and stay f16 (down_proj's, 64, are)
    model = tiny(n_tok, n_head=3, n_kv_head=1)
    summary = write_gguf(model, tok_dir, tmp_path / "m.gguf", dtype=dtype)  # type: ignore[arg-type]
    raw = raw_tensors(tmp_path / "m.gguf")
    assert raw["blk.0.attn_norm.weight"][0] == raw["output_norm.weight"][0] == "F32"
    if dtype == "f16":
        assert summary["tensor_types"] == {"F16": 16, "F32": 5}
    else:
        assert raw["blk.0.ffn_down.weight"][0] == "Q8_0" and raw["blk.0.attn_q.weight"][0] == "F16"
        assert summary["tensor_types"] == {"F16": 14, "F32": 5, "Q8_0": 2}
    cfg, state, _ = read_gguf(tmp_path / "m.gguf")
    assert cfg == model.config
    for name, ours in model.state_dict().items():
        got = state[name]
        assert got.dtype == torch.float32 and got.shape == ours.shape
        scale = float(ours.abs().max())
        # f16: half an ulp (2^-11 relative); Q8_0: half a step of a 32-block's absmax / 127
        tol = 0.0 if ours.ndim == 1 else scale * (2 ** -11 if raw[gguf_name(name)][0] == "F16" else 0.51 / 127 + 1e-3)
        assert float((got - ours).abs().max()) <= tol, name
    report = compare(model, tmp_path / "m.gguf")
    assert report["dtype"] == dtype and report["config_equal"]
    assert 0 < report["max_abs_diff"] < 0.05 and report["n_identical"] >= 5  # the norms at least
    assert report["n_prompts"] == 4 and 0 <= report["n_prompts_same_tokens"] <= 4


def test_tokenizer_metadata_reads_back(tmp_path: Path, tok_dir: Path, n_tok: int) -> None:
    write_gguf(tiny(n_tok + 3), tok_dir, tmp_path / "m.gguf", dtype="f32", name="tiny",
               extra={"lmforge.base_sha256": "ab" * 32, "lmforge.note": ""})
    _, _, meta = read_gguf(tmp_path / "m.gguf")
    spec = json.loads((tok_dir / "tokenizer.json").read_text())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()} | {a["id"]: a["content"] for a in spec["added_tokens"]}
    assert meta["tokenizer.ggml.tokens"] == [by_id[i] for i in range(n_tok)] + [f"[PAD{i}]" for i in range(n_tok, n_tok + 3)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    assert meta["tokenizer.ggml.merges"] == merges and len(merges) > 0
    specials = {a["id"] for a in spec["added_tokens"] if a["special"]}
    assert len(specials) == 16 and meta["tokenizer.ggml.token_type"] == (
        [3 if i in specials else 1 for i in range(n_tok)] + [5] * 3)
    assert meta["tokenizer.ggml.model"] == "gpt2" and meta["tokenizer.ggml.pre"] == "qwen2"
    assert meta["tokenizer.ggml.bos_token_id"] == BOS_ID == 0
    assert meta["tokenizer.ggml.eos_token_id"] == special_id("assistant_end")
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    assert meta["general.name"] == "tiny" and meta["llama.vocab_size"] == n_tok + 3
    assert meta["lmforge.base_sha256"] == "ab" * 32 and meta["lmforge.note"] == ""
    with pytest.raises(LmforgeError, match="general.name"):
        write_gguf(tiny(n_tok), tok_dir, tmp_path / "x.gguf", dtype="f32", extra={"general.name": "x"})


def test_tokenizer_larger_than_the_model_is_refused(tmp_path: Path, tok_dir: Path, n_tok: int) -> None:
    with pytest.raises(InputError, match="tokenizer.json.*vocab_size"):
        write_gguf(tiny(n_tok - 1), tok_dir, tmp_path / "m.gguf", dtype="f32")
    assert not list(tmp_path.iterdir())


def test_same_bytes_every_run(tmp_path: Path, tok_dir: Path, n_tok: int) -> None:
    model = tiny(n_tok, n_head=3)
    for dtype in ("f32", "q8_0"):
        a, b = tmp_path / f"a-{dtype}.gguf", tmp_path / f"b-{dtype}.gguf"
        write_gguf(model, tok_dir, a, dtype=dtype, extra={"lmforge.base_sha256": "x"})  # type: ignore[arg-type]
        write_gguf(model, tok_dir, b, dtype=dtype, extra={"lmforge.base_sha256": "x"})  # type: ignore[arg-type]
        assert a.read_bytes() == b.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-f32.gguf", "a-q8_0.gguf", "b-f32.gguf", "b-q8_0.gguf"]


def test_damaged_files_name_the_path(tmp_path: Path, tok_dir: Path, n_tok: int) -> None:
    good = tmp_path / "good.gguf"
    write_gguf(tiny(n_tok), tok_dir, good, dtype="f32")
    data = good.read_bytes()
    cases = {"truncated.gguf": data[: len(data) // 2], "header.gguf": data[:40], "garbage.gguf": b"not a gguf" * 50,
             "empty.gguf": b""}
    for fname, content in cases.items():
        (tmp_path / fname).write_bytes(content)
        with pytest.raises(InputError, match=fname):
            read_gguf(tmp_path / fname)
    with pytest.raises(InputError, match="missing.gguf: not found"):
        read_gguf(tmp_path / "missing.gguf")

    other = gguf.GGUFWriter(tmp_path / "gpt2.gguf", arch="gpt2")
    other.add_block_count(1)
    other.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    other.write_header_to_file()
    other.write_kv_data_to_file()
    other.write_tensors_to_file()
    other.close()
    with pytest.raises(InputError, match=r"gpt2.gguf: unknown architecture 'gpt2'"):
        read_gguf(tmp_path / "gpt2.gguf")

    bare = gguf.GGUFWriter(tmp_path / "bare.gguf", arch="llama")
    bare.add_block_count(1)
    bare.write_header_to_file()
    bare.write_kv_data_to_file()
    bare.write_tensors_to_file()
    bare.close()
    with pytest.raises(InputError, match=r"bare.gguf: metadata key 'llama.attention.head_count' is missing"):
        read_gguf(tmp_path / "bare.gguf")


def test_f32_mismatch_raises(tmp_path: Path, tok_dir: Path, n_tok: int) -> None:
    model = tiny(n_tok)
    write_gguf(model, tok_dir, tmp_path / "m.gguf", dtype="f32")
    with torch.no_grad():
        model.model.layers[1].mlp.up_proj.weight[0, 0] += 1e-3
    with pytest.raises(LmforgeError, match="1 of 21 tensors differ"):
        compare(model, tmp_path / "m.gguf")
