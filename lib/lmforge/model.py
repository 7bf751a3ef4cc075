"""The model: a decoder-only transformer in the Llama / Qwen3 layout, readable top to bottom.

    from lmforge.model import ModelConfig, GPT
    cfg = ModelConfig.from_depth(depth=4, vocab_size=2048)   # width, heads, KV heads derived
    model = GPT(cfg)                                          # weights initialised by init_weights
    loss = model(idx, targets)                                # mean next-token cross-entropy
    logits = model(idx)                                       # (B, T, vocab)

Pieces: RMSNorm, rotary position embeddings (the rotate-half convention),
grouped-query attention through `scaled_dot_product_attention`, SwiGLU MLP, no biases,
optional QK-norm, tied or untied embeddings. Module names are Hugging Face's
(`model.layers.0.self_attn.q_proj.weight`, ...), so a state dict of this model is a state dict
of `LlamaForCausalLM` (or `Qwen3ForCausalLM` with `qk_norm`): export is a renaming of nothing.

The depth dial (`ModelConfig.from_depth`) follows nanochat: width = depth x aspect_ratio,
heads of `head_dim`, KV heads a fraction of them; any derived value can be given explicitly.
`token_budget(cfg, ratio)` turns a tokens-per-parameter ratio into a training budget.

Inference uses a `KVCache` (see lmforge.engine): `model(idx, cache=cache)` appends the new
keys and values and attends over everything cached; rows may be left-padded (cache.pad).

Eager code runs the norms, the rotation, SwiGLU and the loss as autograd functions with
hand-written backward passes ("fused operations" below): the numbers of the plain formulas
with fewer passes over memory and fewer saved tensors. Compiled code runs the plain formulas.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import model_validator
from torch import nn

from .config import Config
from .errors import ConfigError

# Bit-identical reruns on CPU: the first vectorised transcendental op of a process (in practice
# the rotary tables' cos, computed on two threads at once) came out different in about one process
# in four: a one-time initialisation inside torch's CPU math (with MKL) races when two threads hit
# it together, and the thread that loses computes its half of that one call another way. One tiny
# call on this thread, before any parallel one, does the initialisation alone (measured: 0 of 48
# processes differ with it, 5 of 20 without; tests/test_model.py checks the tables in fresh processes).
torch.zeros(16).exp()


class ModelConfig(Config):
    """Every shape of the network. Build one with `from_depth` or spell every field."""

    vocab_size: int
    n_layer: int
    d_model: int
    n_head: int
    n_kv_head: int
    head_dim: int
    d_mlp: int                    # SwiGLU hidden width
    max_seq_len: int = 1024       # longest context (rotary tables are built for it)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-6
    qk_norm: bool = False         # RMSNorm on each head's queries and keys (Qwen3)
    tie_embeddings: bool = False  # lm_head shares the input embedding matrix

    @model_validator(mode="after")
    def _check_shapes(self) -> ModelConfig:
        for key in ("vocab_size", "n_layer", "d_model", "n_head", "n_kv_head", "head_dim", "d_mlp", "max_seq_len"):
            if getattr(self, key) < 1:
                raise ValueError(f"{key} must be >= 1 (got {getattr(self, key)})")
        if self.n_head * self.head_dim != self.d_model:
            raise ValueError(f"n_head x head_dim = {self.n_head} x {self.head_dim} = {self.n_head * self.head_dim} "
                             f"must equal d_model = {self.d_model}; pick n_head dividing d_model "
                             f"(d_model {self.d_model} / n_head {self.n_head} is not a whole head_dim)"
                             if self.d_model % self.n_head else
                             f"head_dim {self.head_dim} x n_head {self.n_head} != d_model {self.d_model}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_kv_head {self.n_kv_head} must divide n_head {self.n_head} (grouped-query attention)")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (rotary embeddings rotate pairs)")
        return self

    @classmethod
    def from_depth(
        cls,
        depth: int,
        vocab_size: int,
        *,
        aspect_ratio: int = 64,
        head_dim: int = 128,
        kv_ratio: int = 1,
        mlp_ratio: float = 8 / 3,
        **overrides: object,
    ) -> ModelConfig:
        """The depth dial: d_model = depth x aspect_ratio (rounded up to whole heads),
        n_head = d_model / head_dim, n_kv_head = n_head / kv_ratio, d_mlp = mlp_ratio x d_model
        rounded up to a multiple of 64. Keys in `overrides` replace any derived value."""
        if depth < 1:
            raise ConfigError(f"depth must be >= 1 (got {depth})")
        hd = int(overrides.get("head_dim", head_dim))  # type: ignore[call-overload]
        d_model = int(overrides.get("d_model", math.ceil(depth * aspect_ratio / hd) * hd))  # type: ignore[call-overload]
        n_head = int(overrides.get("n_head", max(1, d_model // hd)))  # type: ignore[call-overload]
        derived: dict[str, object] = {
            "vocab_size": vocab_size,
            "n_layer": depth,
            "d_model": d_model,
            "n_head": n_head,
            "n_kv_head": max(1, n_head // kv_ratio),
            "head_dim": hd,
            "d_mlp": 64 * math.ceil(mlp_ratio * d_model / 64),
        }
        derived.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls.model_validate(derived)
        except ValueError as e:
            raise ConfigError(f"model config: {e}") from None

    def n_params(self) -> int:
        """Parameter count (a tied embedding counted once)."""
        attn = self.d_model * self.head_dim * (2 * self.n_head + 2 * self.n_kv_head)
        mlp = 3 * self.d_model * self.d_mlp
        norms = 2 * self.d_model + (2 * self.head_dim if self.qk_norm else 0)
        emb = self.vocab_size * self.d_model * (1 if self.tie_embeddings else 2)
        return self.n_layer * (attn + mlp + norms) + emb + self.d_model

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward): 6 x matmul params + attention scores."""
        matmul = self.n_params() - self.vocab_size * self.d_model * (0 if self.tie_embeddings else 1)
        return 6.0 * matmul + 12.0 * self.n_layer * self.n_head * self.head_dim * seq_len


def token_budget(cfg: ModelConfig, tokens_per_param: float) -> int:
    """Training tokens for a tokens-per-parameter ratio (Chinchilla's is about 20)."""
    return int(tokens_per_param * cfg.n_params())


# --- rotary position embeddings ---------------------------------------------------------

def rope_tables(head_dim: int, max_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin of every position's angles, (max_len, head_dim / 2).

    Hugging Face's tables are these twice over, `cat([t, t], -1)`: the rotate-half layout pairs
    dimension i with i + head_dim / 2, and both members of a pair turn by the same angle."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
    freqs = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
    return freqs.cos(), freqs.sin()


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (B, T, heads, D) turned by the rotary angles, as (B, heads, T, D), attention's layout.

    cos / sin: (T, D/2), or (B, T, D/2) when each row has its own positions. With x's halves
    (x1, x2): (x1 cos - x2 sin, x2 cos + x1 sin), which is Hugging Face's
    x * cos + rotate_half(x) * sin. The plain formula, which compiled code runs (the compiler
    fuses it); eager code runs `_Rotary`, the same computation in fewer passes."""
    x = x.transpose(1, 2)
    cos, sin = cos.to(x.dtype).unsqueeze(-3), sin.to(x.dtype).unsqueeze(-3)  # broadcast over heads
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out: torch.Tensor, *,
            inverse: bool = False) -> torch.Tensor:
    """Write x turned by the angles into `out` (both (..., D), any strides): four elementwise
    passes over half-width views and no temporaries. `inverse` turns the other way, which is
    the transpose of the rotation: the backward pass."""
    h = x.shape[-1] // 2
    x1, x2 = x[..., :h], x[..., h:]
    sign = -1.0 if inverse else 1.0
    torch.mul(x1, cos, out=out[..., :h]).addcmul_(x2, sin, value=-sign)
    torch.mul(x2, cos, out=out[..., h:]).addcmul_(x1, sin, value=sign)
    return out


# --- KV cache -------------------------------------------------------------------------------

@dataclass
class KVCache:
    """Keys and values of every layer for a batch of rows, filled left to right.

    `pos` is how many positions are filled (the same for every row). `pad[b]` is the number
    of left-padding positions of row b: they are never attended to, and row b's first real
    token has position 0 for the rotary embedding.
    """

    k: torch.Tensor  # (n_layer, B, n_kv_head, max_len, head_dim)
    v: torch.Tensor
    pad: torch.Tensor  # (B,) long
    pos: int = 0

    @classmethod
    def empty(cls, cfg: ModelConfig, batch: int, max_len: int, *, device: torch.device | str = "cpu",
              dtype: torch.dtype = torch.float32, pad: torch.Tensor | None = None) -> KVCache:
        shape = (cfg.n_layer, batch, cfg.n_kv_head, max_len, cfg.head_dim)
        pad = torch.zeros(batch, dtype=torch.long, device=device) if pad is None else pad.to(device)
        return cls(torch.zeros(shape, device=device, dtype=dtype), torch.zeros(shape, device=device, dtype=dtype), pad)

    @property
    def max_len(self) -> int:
        return self.k.shape[3]


# --- fused operations -------------------------------------------------------------------------
#
# Eager autograd records each elementwise op of a formula as its own node: one pass over memory
# per op forward, one or more backward, and intermediates kept alive until the backward. The
# functions below compute the same formulas (the same results up to float rounding) with a
# hand-written backward: fewer passes, fewer tensors saved. They matter where nothing fuses for
# us (the CPU, a GPU without torch.compile). Compiled code runs the plain formulas `rotary` and
# `swiglu` instead, which the compiler fuses itself (and `_Rotary` writes into strided views,
# `out=`, which it does not accept) and `cross_entropy` for `_LinearCrossEntropy`;
# `_RMSNorm` traces as it is.

class _RMSNorm(torch.autograd.Function):
    """y = x / sqrt(mean(x^2) + eps) * weight over the last dim.

    Normalised in float32 and cast back to x's dtype before the weight multiplies, as Hugging
    Face's LlamaRMSNorm. Saves the normalised x and 1/rms; the backward is
    dx = (g w - xhat mean(g w xhat)) / rms and dweight = the sum over rows of g xhat."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:  # type: ignore[override]
        # one read of x for the sum of squares: mean(x^2) = ||x||^2 / d, no x^2 temporary
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True, dtype=torch.float32)
        rstd = torch.rsqrt(norm.square_().div_(x.shape[-1]).add_(eps))
        xhat = x * rstd  # float32
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.x_dtype = x.dtype
        return xhat.to(x.dtype) * weight

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:  # type: ignore[override]
        xhat, rstd, weight = ctx.saved_tensors
        d = xhat.shape[-1]
        g_xhat = (g * xhat).reshape(-1, d)  # float32
        dweight = g_xhat.sum(0).to(weight.dtype) if ctx.needs_input_grad[1] else None
        dx = None
        if ctx.needs_input_grad[0]:
            dot = (g_xhat @ weight.float()).view(rstd.shape)  # sum_j g_j w_j xhat_j, one per row
            dx = torch.mul(g, weight, out=g_xhat.view(xhat.shape))  # g_xhat's buffer is free again
            dx.addcmul_(xhat, dot, value=-1.0 / d).mul_(rstd)
            dx = dx.to(ctx.x_dtype)
        return dx, dweight, None


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm (the same `weight` parameter) computed by `_RMSNorm`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _RMSNorm.apply(x, self.weight, self.eps)


class _Rotary(torch.autograd.Function):
    """`rotary` for eager code: the rotation reads x in the projection's layout and writes
    straight into attention's; the backward turns the gradient back the same way. Saves only
    the angles."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        B, T, N, D = x.shape
        cos, sin = cos.to(x.dtype).unsqueeze(-2), sin.to(x.dtype).unsqueeze(-2)  # broadcast over heads
        out = x.new_empty(B, N, T, D)
        _rotate(x, cos, sin, out=out.transpose(1, 2))
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, None, None]:  # type: ignore[override]
        cos, sin = ctx.saved_tensors
        B, N, T, D = g.shape
        grad = g.new_empty(B, T, N, D)
        _rotate(g.transpose(1, 2), cos, sin, out=grad, inverse=True)
        return grad, None, None


def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up, the plain formula (compiled code runs this; eager code `_SwiGLU`)."""
    return F.silu(gate) * up


class _SwiGLU(torch.autograd.Function):
    """`swiglu` with a three-pass backward that allocates nothing: d_up = g silu(gate) and
    d_gate = silu'(gate) g up (aten's fused silu_backward), written over the saved silu(gate)
    and up, which nothing reads after this backward (a second one raises: they were modified)."""

    @staticmethod
    def forward(ctx, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        act = F.silu(gate)
        ctx.save_for_backward(gate, up, act)
        return act * up

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # type: ignore[override]
        gate, up, act = ctx.saved_tensors
        d_up = act.mul_(g)
        d_gate = torch.ops.aten.silu_backward.grad_input(up.mul_(g), gate, grad_input=up)
        return d_gate, d_up


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of logits (N, V) against targets (N,), rows with target -1 left out:
    the plain formula (compiled code runs this; eager code `_LinearCrossEntropy`)."""
    return F.cross_entropy(logits.float(), targets, ignore_index=-1)


# Rows per chunk of `_LinearCrossEntropy` = this many logits / vocab size: on the CPU a chunk's
# float32 logits (4 MiB) stay in cache between the matmul that makes them and the softmax and
# gradient that read them; on a GPU, chunks big enough to keep the kernels busy. At least
# CHUNK_MIN_ROWS rows: with a large vocabulary, fewer rows make skinny matmuls and one more pass
# over the (vocab, d) weight gradient per chunk (4096 tokens, d 768, a 32k vocab, on the CPU: 6.9 s
# forward and backward in 32-row chunks, 4.0 s in 512-row ones, 4.1 s for the plain formula, which
# holds all 512 MB of logits).
CHUNK_LOGITS = {"cpu": 1 << 20}
CHUNK_LOGITS_GPU = 1 << 26
CHUNK_MIN_ROWS = 512


class _LinearCrossEntropy(torch.autograd.Function):
    """cross_entropy(x @ weight.T, targets) without ever holding the (N, V) logits.

    Rows go in chunks: a chunk's logits, their float32 log-softmax, the loss terms and, when a
    gradient is wanted, (softmax - onehot) / n turned at once into the chunk's rows of dx and
    its share of dweight, while the logits are still in cache. The forward pass keeps only dx
    (N, d) and dweight (V, d); the backward scales them by the incoming gradient. The value
    and gradients are those of `cross_entropy(lm_head(x), targets)` up to float rounding.
    Under autocast the matmuls run in its dtype, the softmax in float32, and dweight is summed
    in float32. `grad` False (no_grad, evaluation) skips the gradient work."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,  # type: ignore[override]
                grad: bool) -> torch.Tensor:
        dev = x.device.type
        dtype = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else weight.dtype
        need_x, need_w = (grad and ctx.needs_input_grad[0]), (grad and ctx.needs_input_grad[1])
        keep = targets != -1
        scale = keep.to(torch.float32) / keep.sum()  # 1/n for the rows counted, 0 for the others
        safe = targets.masked_fill(~keep, 0).unsqueeze(1)
        with torch.autocast(dev, enabled=False):
            xc, wc = x.to(dtype), weight.to(dtype)
            dx = torch.empty_like(xc) if need_x else None
            dw = torch.zeros(weight.shape, dtype=torch.float32, device=x.device) if need_w else None
            loss = torch.zeros((), dtype=torch.float32, device=x.device)
            rows = max(CHUNK_MIN_ROWS, CHUNK_LOGITS.get(dev, CHUNK_LOGITS_GPU) // weight.shape[0])
            for s in range(0, x.shape[0], rows):
                e = s + rows
                logp = torch.log_softmax((xc[s:e] @ wc.t()).float(), dim=-1)
                loss -= logp.gather(1, safe[s:e]).squeeze(1) @ scale[s:e]
                if not (need_x or need_w):
                    continue
                g = logp.exp_()  # softmax, then (softmax - onehot) / n in place
                g.scatter_add_(1, safe[s:e], torch.full_like(safe[s:e], -1, dtype=g.dtype))
                g = g.mul_(scale[s:e, None]).to(dtype)
                if need_x:
                    torch.mm(g, wc, out=dx[s:e])  # type: ignore[index]
                if need_w and dtype == torch.float32:
                    dw.addmm_(g.t(), xc[s:e])  # type: ignore[union-attr]
                elif need_w:
                    dw.add_(g.t() @ xc[s:e])  # type: ignore[union-attr]
        ctx.save_for_backward(dx, dw)
        ctx.dtypes = x.dtype, weight.dtype
        return loss

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None, None]:  # type: ignore[override]
        dx, dw = ctx.saved_tensors
        if dx is None and dw is None:
            raise RuntimeError("_LinearCrossEntropy: no gradient was computed (forward ran with grad=False)")
        dx = None if dx is None else dx.mul_(g).to(ctx.dtypes[0])
        dw = None if dw is None else dw.mul_(g).to(ctx.dtypes[1])
        return dx, dw, None, None


# --- blocks -----------------------------------------------------------------------------------

class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
            self.k_norm = RMSNorm(cfg.head_dim, eps=cfg.norm_eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, H, T, D)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        rotate = rotary if torch.compiler.is_compiling() else _Rotary.apply
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # (B, H, T, D)
        if cache is not None:
            end = cache.pos + T
            cache.k[layer, :, :, cache.pos:end] = k
            cache.v[layer, :, :, cache.pos:end] = v
            k, v = cache.k[layer, :, :, :end], cache.v[layer, :, :, :end]
        gqa = self.n_head != self.n_kv_head
        if mask is None:  # training, or a prefill of an empty cache with no padding
            # One cached decoding step attends to everything; with no cache causal is always
            # right, and deciding it without T keeps the graph exportable with a symbolic T (ONNX).
            y = F.scaled_dot_product_attention(q, k, v, is_causal=cache is None or T > 1, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_mlp, bias=False)
        self.down_proj = nn.Linear(cfg.d_mlp, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(swiglu(gate, up) if torch.compiler.is_compiling() else _SwiGLU.apply(gate, up))


class Block(nn.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache, layer, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """Hugging Face's `model.` prefix: embeddings, blocks, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.d_model, eps=cfg.norm_eps)


class GPT(nn.Module):
    def __init__(self, cfg: ModelConfig, *, init: bool = True):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        # Derived from the config, never trained or saved: not part of the state dict.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        if init:
            init_weights(self)

    def _positions(self, T: int, cache: KVCache | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """cos, sin ((T, D/2), or (B, T, D/2) per row) and the attention mask (None: plain
        causal) for the next T positions; computed once per forward, shared by every layer."""
        start = 0 if cache is None else cache.pos
        if start + T > self.config.max_seq_len:
            raise ValueError(f"sequence of {start + T} positions exceeds max_seq_len {self.config.max_seq_len}")
        padded = cache is not None and bool(cache.pad.any())
        if not padded and (start == 0 or T == 1):
            # training, a prefill of an empty cache, or one decoding step: causal needs no mask
            return self.rope_cos[start:start + T], self.rope_sin[start:start + T], None
        # Otherwise each row's positions count from its first real token, and the mask hides
        # the left padding and the future.
        assert cache is not None
        dev = cache.pad.device
        q_pos = torch.arange(start, start + T, device=dev)
        k_pos = torch.arange(start + T, device=dev)
        allowed = (k_pos[None, None, :] <= q_pos[None, :, None]) & (k_pos[None, None, :] >= cache.pad[:, None, None])
        # a padding query sees itself, so no softmax row is empty (NaN would leak through V)
        allowed |= k_pos[None, None, :] == q_pos[None, :, None]
        rel = (q_pos[None, :] - cache.pad[:, None]).clamp(min=0)  # (B, T)
        return self.rope_cos[rel], self.rope_sin[rel], allowed[:, None]  # (B, T, D/2), (B, 1, T, S)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, *,
                cache: KVCache | None = None) -> torch.Tensor:
        """Logits (B, T, vocab), or with `targets` the mean cross-entropy over targets != -1."""
        B, T = idx.shape
        cos, sin, mask = self._positions(T, cache)
        x = self.model.embed_tokens(idx)
        for i, block in enumerate(self.model.layers):
            x = block(x, cos, sin, cache, i, mask)
        x = self.model.norm(x)
        if cache is not None:
            cache.pos += T
        if targets is None:
            return self.lm_head(x)
        x, targets = x.view(-1, x.size(-1)), targets.reshape(-1)
        if torch.compiler.is_compiling():
            return cross_entropy(self.lm_head(x), targets)
        return _LinearCrossEntropy.apply(x, self.lm_head.weight, targets, torch.is_grad_enabled())


@torch.no_grad()
def init_weights(model: GPT) -> None:
    """The one init: embeddings N(0, 1) (N(0, d^-1/2) when tied to the head), every input
    projection uniform with the variance of N(0, 1/fan_in), output projections (o_proj,
    down_proj) zero so each block starts as the identity, the untied head N(0, 0.001^2),
    norms one. Deterministic given torch's RNG state."""
    cfg = model.config
    emb_std = cfg.d_model ** -0.5 if cfg.tie_embeddings else 1.0
    nn.init.normal_(model.model.embed_tokens.weight, std=emb_std)
    if not cfg.tie_embeddings:
        nn.init.normal_(model.lm_head.weight, std=0.001)
    for name, p in model.named_parameters():
        if name.startswith(("model.embed_tokens", "lm_head")):
            continue
        if p.ndim == 1:
            nn.init.ones_(p)
        elif name.endswith(("o_proj.weight", "down_proj.weight")):
            nn.init.zeros_(p)
        else:
            bound = math.sqrt(3.0) * p.shape[1] ** -0.5
            nn.init.uniform_(p, -bound, bound)
