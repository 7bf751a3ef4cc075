"""The model: logits, loss and gradients equal to Hugging Face Llama / Qwen3 on the same state
dict, the depth dial and its parameter count, config errors, the init, the KV cache (plain
and left-padded) against full forwards, and a tiny model that learns. CPU, float32, seconds."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from lmforge import model as model_module
from lmforge.errors import ConfigError
from lmforge.model import GPT, KVCache, ModelConfig, token_budget

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def small(**overrides: object) -> ModelConfig:
    """Two layers, width 64, four heads of 16 (two KV heads unless overridden)."""
    fields: dict[str, object] = {
        "vocab_size": 97, "n_layer": 2, "d_model": 64, "n_head": 4, "n_kv_head": 2, "head_dim": 16,
        "d_mlp": 96, "max_seq_len": 64, "rope_theta": 5000.0, "norm_eps": 1e-5,
    }
    fields.update(overrides)
    return ModelConfig.model_validate(fields)


def randomised(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A model whose every weight is random: the init zeroes o_proj and down_proj and sets the
    norms to one, which would hide a wrong attention, MLP or norm from a logits comparison."""
    torch.manual_seed(seed)
    model = GPT(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if p.ndim == 1 else 0.2 * torch.randn_like(p))
    return model


def hugging_face(cfg: ModelConfig) -> torch.nn.Module:
    """LlamaForCausalLM (Qwen3ForCausalLM with qk_norm) of the same shapes, float32, SDPA."""
    config_cls, model_cls = (Qwen3Config, Qwen3ForCausalLM) if cfg.qk_norm else (LlamaConfig, LlamaForCausalLM)
    hf_cfg = config_cls(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
        mlp_bias=False, attn_implementation="sdpa",
    )
    return model_cls(hf_cfg).float()


HF_CASES = [
    pytest.param({"qk_norm": False, "tie_embeddings": False, "n_kv_head": 4}, id="llama-mha-untied"),
    pytest.param({"qk_norm": False, "tie_embeddings": True, "n_kv_head": 2}, id="llama-gqa-tied"),
    pytest.param({"qk_norm": True, "tie_embeddings": False, "n_kv_head": 1}, id="qwen3-gqa-untied"),
    pytest.param({"qk_norm": True, "tie_embeddings": True, "n_kv_head": 4}, id="qwen3-mha-tied"),
]


@pytest.mark.parametrize("overrides", HF_CASES)
def test_matches_hugging_face(overrides: dict[str, object]) -> None:
    cfg = small(**overrides)
    ours = randomised(cfg)
    hf = hugging_face(cfg)
    hf.load_state_dict(ours.state_dict(), strict=True)  # the same keys, one to one
    assert set(ours.state_dict()) == set(hf.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(1))

    want = hf(input_ids=idx).logits
    assert torch.allclose(ours(idx), want, atol=1e-4, rtol=0)  # autograd recording (training kernels)
    with torch.no_grad():
        assert torch.allclose(ours(idx), want, atol=1e-4, rtol=0)  # inference kernels

    # loss and every gradient: Hugging Face shifts labels itself and ignores -100; ours takes
    # the next tokens and ignores -1
    labels = idx.clone()
    labels[0, 5:9] = -100
    targets = torch.cat([labels[:, 1:], torch.full((3, 1), -100)], dim=1)
    targets[targets == -100] = -1
    loss = ours(idx, targets)
    hf_loss = hf(input_ids=idx, labels=labels).loss
    assert torch.allclose(loss, hf_loss, atol=1e-5, rtol=0)
    loss.backward()
    hf_loss.backward()
    hf_params = dict(hf.named_parameters())
    for name, p in ours.named_parameters():
        assert torch.allclose(p.grad, hf_params[name].grad, atol=1e-5, rtol=1e-4), name


def test_loss_equals_cross_entropy_with_ignored_rows() -> None:
    cfg = small()
    model = randomised(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    targets = torch.randint(0, cfg.vocab_size, (2, 16))
    targets[1, ::3] = -1
    logits = model(idx).detach().requires_grad_()
    want = F.cross_entropy(logits.view(-1, cfg.vocab_size), targets.view(-1), ignore_index=-1)
    want.backward()
    params = list(model.parameters())
    loss = model(idx, targets)
    assert torch.allclose(loss, want, atol=1e-6)
    loss.backward()  # gradients reach every parameter
    assert all(p.grad is not None for p in params)


def test_a_second_backward_through_one_graph_raises() -> None:
    """The loss and SwiGLU backward passes reuse saved buffers: a second pass must fail, not
    return wrong gradients."""
    model = randomised(small())
    idx = torch.randint(0, 97, (2, 8))
    loss = model(idx, idx)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_autocast_bf16_runs_close_to_float32() -> None:
    cfg = small()
    model = randomised(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    targets = torch.randint(0, cfg.vocab_size, (2, 24))
    exact = model(idx, targets).item()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(idx, targets)
    loss.backward()
    assert abs(loss.item() - exact) < 0.1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_fused_kernels_equal_the_plain_formulas() -> None:
    """The hand-written backward passes against autograd through the plain formulas."""
    g = torch.Generator().manual_seed(4)
    B, T, H, D = 2, 7, 4, 16

    def both(fused: Callable[..., Any], plain: Callable[..., Any], *inputs: torch.Tensor, grads: int = 1) -> None:
        """Outputs and the gradients of the first `grads` inputs agree."""
        leaves = [[x.clone().requires_grad_(i < grads) for i, x in enumerate(inputs)] for _ in range(2)]
        outs = [fused(*leaves[0]), plain(*leaves[1])]
        outs = [o if isinstance(o, tuple) else (o,) for o in outs]
        weights = [torch.randn(o.shape, generator=g) for o in outs[0]]
        for ours, ref in zip(*outs, strict=True):
            assert torch.allclose(ours, ref, atol=1e-6)
        for side in range(2):
            sum((o * w).sum() for o, w in zip(outs[side], weights, strict=True)).backward()
        for a, b in zip(leaves[0][:grads], leaves[1][:grads], strict=True):
            assert torch.allclose(a.grad, b.grad, atol=1e-5)

    x = torch.randn(B, T, H, D, generator=g)
    for cos, sin in [(torch.randn(T, D // 2, generator=g), torch.randn(T, D // 2, generator=g)),
                     (torch.randn(B, T, D // 2, generator=g), torch.randn(B, T, D // 2, generator=g))]:
        both(model_module._Rotary.apply, model_module.rotary, x, cos, sin)
    both(model_module._SwiGLU.apply, model_module.swiglu, *torch.randn(2, B, T, 24, generator=g), grads=2)
    both(lambda x, w: model_module._RMSNorm.apply(x, w, 1e-5), lambda x, w: F.rms_norm(x, (32,), w, 1e-5),
         torch.randn(B, T, 32, generator=g) * 3, 1 + torch.randn(32, generator=g), grads=2)


@pytest.mark.parametrize("rows_per_chunk", [1, 5, 1000])
def test_linear_cross_entropy_equals_the_plain_formula(monkeypatch: pytest.MonkeyPatch, rows_per_chunk: int) -> None:
    """The chunked loss of the head: value and both gradients, in float32 and under bf16
    autocast, for chunks of one row, a few rows, and all rows; ignored targets left out."""
    g = torch.Generator().manual_seed(5)
    N, d, V = 23, 16, 11
    monkeypatch.setitem(model_module.CHUNK_LOGITS, "cpu", rows_per_chunk * V)
    monkeypatch.setattr(model_module, "CHUNK_MIN_ROWS", 1)
    targets = torch.randint(0, V, (N,), generator=g)
    targets[::4] = -1
    x0, w0 = torch.randn(N, d, generator=g), torch.randn(V, d, generator=g)
    for autocast, tol in ((False, 1e-6), (True, 2e-2)):
        grads = []
        for fused in (True, False):
            x, w = x0.clone().requires_grad_(), w0.clone().requires_grad_()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
                loss = (model_module._LinearCrossEntropy.apply(x, w, targets, True) if fused
                        else model_module.cross_entropy(x @ w.t(), targets))
            (3 * loss).backward()
            grads.append((loss.detach(), x.grad, w.grad))
        for ours, ref in zip(*grads, strict=True):
            assert ours.dtype == ref.dtype == torch.float32
            assert torch.allclose(ours, ref, atol=tol, rtol=tol)
    with torch.no_grad():  # evaluation: the value only, and no gradient work
        assert torch.allclose(model_module._LinearCrossEntropy.apply(x0, w0, targets, False),
                              model_module.cross_entropy(x0 @ w0.t(), targets), atol=1e-6)


def test_compiled_code_path_equals_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under torch.compile the model runs the plain formulas; run them eagerly and compare."""
    cfg = small(qk_norm=True)
    model = randomised(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 24))
    targets = torch.randint(0, cfg.vocab_size, (2, 24))
    model(idx, targets).backward()
    fused = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    with torch.no_grad():
        logits = model(idx)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    with torch.no_grad():
        assert torch.allclose(model(idx), logits, atol=1e-5)
    model(idx, targets).backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, fused[name], atol=1e-5), name


# --- the depth dial ---------------------------------------------------------------------------

def test_from_depth_derives_shapes() -> None:
    cfg = ModelConfig.from_depth(4, 2048, aspect_ratio=64, head_dim=64, max_seq_len=512)
    assert (cfg.n_layer, cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, cfg.d_mlp) == (4, 256, 4, 4, 64, 704)
    assert cfg.vocab_size == 2048 and cfg.max_seq_len == 512
    # width rounded up to whole heads; KV heads a fraction of the heads; d_mlp a multiple of 64
    cfg = ModelConfig.from_depth(3, 1000, aspect_ratio=64, head_dim=128, kv_ratio=2)
    assert (cfg.d_model, cfg.n_head, cfg.n_kv_head) == (256, 2, 1)
    assert cfg.d_mlp == 64 * math.ceil(8 / 3 * 256 / 64) == 704


def test_from_depth_overrides_win() -> None:
    cfg = ModelConfig.from_depth(4, 2048, head_dim=64, d_model=512, n_kv_head=2, d_mlp=1000, qk_norm=True)
    assert (cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.d_mlp, cfg.qk_norm) == (512, 8, 2, 1000, True)
    cfg = ModelConfig.from_depth(4, 2048, head_dim=64, n_head=2, d_model=128, tie_embeddings=True)
    assert (cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.tie_embeddings) == (128, 2, 2, True)


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("qk_norm", [False, True])
def test_n_params_is_the_real_count(tie: bool, qk_norm: bool) -> None:
    cfg = ModelConfig.from_depth(2, 300, aspect_ratio=32, head_dim=16, kv_ratio=2, tie_embeddings=tie, qk_norm=qk_norm)
    model = GPT(cfg)
    assert cfg.n_params() == sum(p.numel() for p in model.parameters())  # a tied matrix counted once
    assert token_budget(cfg, 20) == int(20 * cfg.n_params())
    assert token_budget(cfg, 0.5) == int(0.5 * cfg.n_params())
    assert cfg.flops_per_token(128) > 6 * (cfg.n_params() - cfg.vocab_size * cfg.d_model)


# --- bad configs ------------------------------------------------------------------------------

def test_heads_not_dividing_the_width() -> None:
    with pytest.raises(ConfigError, match=r"n_head.*d_model"):
        ModelConfig.from_depth(2, 100, d_model=100, n_head=3)
    with pytest.raises(ValidationError, match=r"n_head.*d_model"):
        small(d_model=100, n_head=3, head_dim=33)


def test_kv_heads_not_dividing_heads() -> None:
    with pytest.raises(ConfigError, match=r"n_kv_head 3 must divide n_head 4"):
        ModelConfig.from_depth(4, 100, head_dim=64, n_kv_head=3)
    with pytest.raises(ValidationError, match="n_kv_head"):
        small(n_kv_head=3)


def test_odd_head_dim_and_nonpositive_sizes() -> None:
    with pytest.raises(ValidationError, match="head_dim 15 must be even"):
        small(d_model=60, n_head=4, head_dim=15)
    with pytest.raises(ConfigError, match="head_dim 15 must be even"):
        ModelConfig.from_depth(2, 100, head_dim=15, d_model=60)
    with pytest.raises(ConfigError, match="depth must be >= 1"):
        ModelConfig.from_depth(0, 100)
    with pytest.raises(ValidationError, match="vocab_size must be >= 1"):
        small(vocab_size=0)


# --- init -------------------------------------------------------------------------------------

def test_init_is_deterministic_and_shaped() -> None:
    cfg = small(qk_norm=True)
    torch.manual_seed(3)
    a = GPT(cfg).state_dict()
    torch.manual_seed(3)
    b = GPT(cfg).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for name, w in a.items():
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            assert not w.any(), name  # each block starts as the identity
        elif w.ndim == 1:
            assert torch.equal(w, torch.ones_like(w)), name
    assert abs(a["lm_head.weight"].std().item() - 0.001) < 2e-4
    assert abs(a["model.embed_tokens.weight"].std().item() - 1.0) < 0.05


def test_loss_at_init_is_ln_vocab() -> None:
    cfg = small(vocab_size=512)
    torch.manual_seed(0)
    model = GPT(cfg)
    idx = torch.randint(0, 512, (4, 32))
    loss = model(idx, torch.randint(0, 512, (4, 32))).item()
    assert abs(loss - math.log(512)) < 0.02  # the untied head starts near zero: uniform predictions


# --- the KV cache -----------------------------------------------------------------------------

@torch.inference_mode()
def test_cache_prefill_then_decode_equals_full_forward() -> None:
    cfg = small()
    model = randomised(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 20))
    full = model(idx)
    cache = KVCache.empty(cfg, 2, 20)
    steps = [model(idx[:, :7], cache=cache), model(idx[:, 7:12], cache=cache)]  # an empty cache, then more
    steps += [model(idx[:, t:t + 1], cache=cache) for t in range(12, 20)]       # one token at a time
    assert cache.pos == 20
    assert torch.allclose(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


@torch.inference_mode()
def test_left_padded_cache_equals_unpadded_rows() -> None:
    cfg = small(qk_norm=True)
    model = randomised(cfg)
    g = torch.Generator().manual_seed(2)
    prompt, new = [6, 3, 8], 5  # each row: a prompt, then `new` tokens fed one at a time
    seqs = [torch.randint(0, cfg.vocab_size, (n + new,), generator=g) for n in prompt]
    width = max(prompt)
    pad = torch.tensor([width - n for n in prompt])
    idx = torch.stack([torch.cat([torch.full((width - n,), 7), s[:n]]) for s, n in zip(seqs, prompt, strict=True)])
    cache = KVCache.empty(cfg, 3, width + new, pad=pad)
    logits = [model(idx, cache=cache)]
    for t in range(new):
        logits.append(model(torch.stack([s[n + t] for s, n in zip(seqs, prompt, strict=True)])[:, None], cache=cache))
    got = torch.cat(logits, dim=1)
    for b, (s, n) in enumerate(zip(seqs, prompt, strict=True)):
        want = model(s[None, :n + new])[0]
        assert torch.allclose(got[b, width - n:], want, atol=1e-5, rtol=0), b


def test_too_long_a_sequence_is_refused() -> None:
    cfg = small(max_seq_len=16)
    with pytest.raises(ValueError, match="exceeds max_seq_len 16"):
        GPT(cfg)(torch.zeros(1, 17, dtype=torch.long))


# --- learning ---------------------------------------------------------------------------------

def test_tiny_model_learns_a_repeated_sequence() -> None:
    torch.manual_seed(0)
    cfg = small(vocab_size=64)
    model = GPT(cfg)
    seq = torch.randint(0, 64, (33,)).repeat(4, 1)
    x, y = seq[:, :-1], seq[:, 1:]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 0.9 * math.log(64)
    assert losses[-1] < 0.25 * losses[0], losses


# What a stage does first (the imports of lmforge.weights, then a model): without the warm-up this
# built different tables in 5 of 20 processes, with it in 0 of 48.
_ROPE_PROBE = """
import hashlib, sys
sys.path.insert(0, sys.argv[1])
from lmforge.weights import load_model
from lmforge.model import GPT, ModelConfig
m = GPT(ModelConfig(vocab_size=2048, n_layer=3, d_model=192, n_head=3, n_kv_head=3, head_dim=64, d_mlp=512,
                    max_seq_len=256), init=False)
print(hashlib.sha256(m.rope_cos.numpy().tobytes() + m.rope_sin.numpy().tobytes()).hexdigest())
"""


def test_rotary_tables_are_bit_identical_in_fresh_processes() -> None:
    """Without the warm-up at import, about one process in four built different tables (a race in
    torch's one-time CPU math initialisation when the first such op runs on two threads)."""
    import hashlib
    import subprocess
    import sys
    from pathlib import Path

    lib = str(Path(model_module.__file__).resolve().parent.parent)
    cos, sin = model_module.rope_tables(64, 256, 10000.0)
    want = hashlib.sha256(cos.numpy().tobytes() + sin.numpy().tobytes()).hexdigest()
    got = []
    for _ in range(8):  # two processes at a time: the race is inside each process, and CI has two cores
        procs = [subprocess.Popen([sys.executable, "-c", _ROPE_PROBE, lib], stdout=subprocess.PIPE, text=True)
                 for _ in range(2)]
        got += [p.communicate()[0].strip() for p in procs]
        assert all(p.returncode == 0 for p in procs)
    assert got == [want] * 16
