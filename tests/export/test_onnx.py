"""The ONNX export: onnxruntime computes our logits for any batch and length, and decodes the same tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lmforge.export.onnx import parity, session, write_onnx
from lmforge.model import GPT, ModelConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def model(qk_norm: bool) -> GPT:
    torch.manual_seed(1)
    m = GPT(ModelConfig(vocab_size=256, n_layer=2, d_model=64, n_head=4, n_kv_head=2, head_dim=16, d_mlp=128,
                        max_seq_len=64, qk_norm=qk_norm))
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 2 and "embed_tokens" not in name:
                p.normal_(0.0, p.shape[1] ** -0.5)
    return m.eval()


@pytest.mark.parametrize("qk_norm", [False, True], ids=["llama", "qwen3"])
def test_onnxruntime_matches_our_logits_at_every_shape_and_greedy_tokens(tmp_path: Path, qk_norm: bool) -> None:
    m = model(qk_norm)
    summary = write_onnx(m, tmp_path / "m.onnx")
    assert summary["inputs"] == ["input_ids"] and summary["outputs"] == ["logits"]
    sess = session(tmp_path / "m.onnx")
    g = torch.Generator().manual_seed(0)
    for shape in [(1, 1), (1, 13), (5, 7), (2, 64)]:  # dynamic batch and sequence, up to max_seq_len
        x = torch.randint(0, 256, shape, generator=g)
        theirs = sess.run(["logits"], {"input_ids": x.numpy()})[0]
        with torch.no_grad():
            assert np.abs(theirs - m(x).numpy()).max() <= 1e-4, shape
    p = parity(m, tmp_path / "m.onnx", [[0, 5, 9, 200], [0, 17, 3, 3, 41]], n_tokens=32)
    assert p["max_abs_logit_diff"] <= 1e-4 and p["greedy_same"], p


def test_the_onnx_file_is_the_same_bytes_wherever_and_whenever_it_is_exported(tmp_path: Path) -> None:
    m = model(False)
    write_onnx(m, tmp_path / "a.onnx")
    write_onnx(m, tmp_path / "b.onnx")
    data = (tmp_path / "a.onnx").read_bytes()
    assert data == (tmp_path / "b.onnx").read_bytes()
    # nor does it depend on where the code lives: no stack traces with this checkout's paths
    lib = Path(__file__).resolve().parents[2] / "lib"
    assert str(lib).encode() not in data and b"stack_trace" not in data
