"""GGUF export for llama.cpp, with a read-back check against our own model.

    from lmforge.export.gguf import write_gguf, read_gguf, compare
    summary = write_gguf(model, tokenizer_dir, Path("out/model-q8_0.gguf"), dtype="q8_0",
                         extra={"lmforge.base_sha256": digest})   # {"arch", "dtype", "n_tensors", "bytes", ...}
    cfg, state, meta = read_gguf(Path("out/model-q8_0.gguf"))      # ModelConfig, our names (float32), metadata
    report = compare(model, Path("out/model-q8_0.gguf"))           # numbers; f32 must be identical

The file follows llama.cpp's own converter (convert_hf_to_gguf.py):

- Architecture `llama` without QK-norm, `qwen3` with it. Tensor names `token_embd`,
  `blk.N.{attn_norm,attn_q,attn_k,attn_v,attn_output,attn_q_norm,attn_k_norm,ffn_norm,ffn_gate,
  ffn_up,ffn_down}`, `output_norm`, `output` (left out when the head is tied: llama.cpp then
  reuses `token_embd`).
- Rotary: our q/k projections use the rotate-half (NeoX) pairing, as Hugging Face's Llama.
  llama.cpp runs `llama` with the interleaved (GPT-J) pairing, so for `llama` the rows of q_proj
  and k_proj are permuted within each head (`_permute`, the converter's `LlamaModel.permute`);
  `read_gguf` undoes it. `qwen3` runs NeoX rope in llama.cpp and is written unpermuted.
- dtype `f32`: every tensor float32. `f16`: 2-D tensors float16, 1-D ones (the norms) float32.
  `q8_0`: 2-D tensors Q8_0 when their row length (the input dimension) is a multiple of 32,
  the block size, else float16 (the converter's fallback); norms float32. Q8_0 is bit-exact
  with ggml's reference quantizer (gguf.quants).
- Tokenizer: llama.cpp's `gpt2` (byte-level BPE) model: the token strings in id order
  (tokenizer.json's vocab and added tokens; ids past the tokenizer up to the model's vocab_size
  become `[PADi]`, type UNUSED, as the converter does), special tokens typed CONTROL, merges as
  "a b", bos `<|bos|>`, eos `<|assistant_end|>` (the end of a chat turn), add_bos_token true and
  the chat template of tokenizer_config.json.
- Pre-tokenizer `tokenizer.ggml.pre = "qwen2"`: its regex is lmforge's SPLIT_PATTERN exactly
  (ASCII-cased contractions, single digits, `[^\\r\\n\\p{L}\\p{N}]?\\p{L}+`, ...), and llama.cpp
  runs it with a hand-written splitter (unicode.cpp). One difference remains: our BPE has
  `ignore_merges` (a pre-token that is a vocabulary entry is emitted whole, as tiktoken does);
  llama.cpp applies the merges to such a word (it sets ignore_merges only for the llama3 family,
  whose regex groups digits by three). The two agree unless a vocabulary entry cannot be reached
  by merging its own bytes in rank order; write_gguf refuses a tokenizer whose split regex is
  not SPLIT_PATTERN, since no llama.cpp pre-tokenizer would then match it.

Writing is deterministic (the same model gives the same bytes) and atomic (a temporary file in
the target directory, then a rename). bench/gguf_llamacpp.py runs the files in llama.cpp itself
(greedy tokens and tokenization against ours; results in bench/results/gguf_llamacpp.md).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import gguf
import numpy as np
import torch

from ..atomic import atomic_path
from ..engine import generate
from ..errors import InputError, LmforgeError
from ..inputs import MAX_TOKENIZER_BYTES
from ..model import GPT, ModelConfig
from ..tokenizer import BOS, BOS_ID, CONFIG_FILE, SPLIT_PATTERN, TOKENIZER_FILE
from ..weights import state_for_save
from .jsonfile import read_object

Dtype = Literal["f32", "f16", "q8_0"]
ARCHS = ("llama", "qwen3")
PRE_TOKENIZER = "qwen2"
EOS = "<|assistant_end|>"
Q8_BLOCK = 32
GREEDY_TOKENS = 32

_T = gguf.GGMLQuantizationType
_FILE_TYPE = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
              "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
_LAYER = {  # ours (after "model.layers.N.") -> GGUF (after "blk.N.")
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}
_GLOBAL_BACK = {v: k for k, v in _GLOBAL.items()}


def gguf_name(name: str) -> str:
    """Our (Hugging Face) tensor name -> llama.cpp's."""
    if name in _GLOBAL:
        return _GLOBAL[name]
    m = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER:
        return f"blk.{m.group(1)}.{_LAYER[m.group(2)]}"
    raise LmforgeError(f"tensor {name!r} has no GGUF name (is this an lmforge GPT?)")


def _our_name(name: str) -> str | None:
    if name in _GLOBAL_BACK:
        return _GLOBAL_BACK[name]
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
    if m and m.group(2) in _LAYER_BACK:
        return f"model.layers.{m.group(1)}.{_LAYER_BACK[m.group(2)]}"
    return None


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """q/k rows from rotate-half order (pairs i, i + D/2 in each head) to interleaved order
    (pairs 2i, 2i + 1), as llama.cpp's converter does for `llama`."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of `_permute`."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _arch(cfg: ModelConfig) -> str:
    return "qwen3" if cfg.qk_norm else "llama"


def _qtype(array: np.ndarray, dtype: Dtype) -> gguf.GGMLQuantizationType:
    if array.ndim <= 1 or dtype == "f32":
        return _T.F32
    if dtype == "q8_0" and array.shape[-1] % Q8_BLOCK == 0:
        return _T.Q8_0
    return _T.F16


# --- the tokenizer -----------------------------------------------------------------------------

def _read_json(path: Path) -> dict[str, Any]:
    # tokenizer.json of a large vocabulary is tens of MiB: the tokenizer's limit, not the metadata one
    return read_object(path, missing="pass the tokenizer directory the model was trained with",
                       invalid="re-run the tokenizer stage", limit=MAX_TOKENIZER_BYTES)


def _tokenizer_fields(tokenizer_dir: Path, n_vocab: int) -> dict[str, Any]:
    """Token strings, types, merges, bos/eos ids and chat template for llama.cpp's gpt2 model."""
    path = tokenizer_dir / TOKENIZER_FILE
    spec = _read_json(path)
    model = spec.get("model") or {}
    if model.get("type") != "BPE":
        raise InputError(path, f"model type {model.get('type')!r}, expected BPE", fix="use an lmforge tokenizer")
    parts = (spec.get("pre_tokenizer") or {}).get("pretokenizers") or []
    pattern = ((parts[0].get("pattern") or {}).get("Regex") if parts else None)
    if pattern != SPLIT_PATTERN or [p.get("type") for p in parts] != ["Split", "ByteLevel"]:
        raise InputError(path, "the pre-tokenizer is not lmforge's Split(SPLIT_PATTERN) + ByteLevel, so llama.cpp's "
                         f"{PRE_TOKENIZER!r} pre-tokenizer would split text differently",
                         fix="export a model trained with lmforge.tokenizer")
    by_id: dict[int, str] = {int(i): t for t, i in model.get("vocab", {}).items()}
    special: set[int] = set()
    for added in spec.get("added_tokens", []):
        by_id[int(added["id"])] = added["content"]
        if added.get("special"):
            special.add(int(added["id"]))
    n_tok = len(by_id)
    if sorted(by_id) != list(range(n_tok)):
        raise InputError(path, "token ids are not 0..n-1 without gaps", fix="re-run the tokenizer stage")
    if n_tok > n_vocab:
        raise InputError(path, f"the tokenizer has {n_tok} tokens but the model's vocab_size is {n_vocab}",
                         fix="pass the tokenizer the model was trained with")
    tokens = [by_id[i] for i in range(n_tok)] + [f"[PAD{i}]" for i in range(n_tok, n_vocab)]
    types = [int(gguf.TokenType.CONTROL if i in special else gguf.TokenType.NORMAL) for i in range(n_tok)]
    types += [int(gguf.TokenType.UNUSED)] * (n_vocab - n_tok)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    ids = {t: i for i, t in enumerate(tokens[:n_tok])}
    for token in (BOS, EOS):
        if token not in ids:
            raise InputError(path, f"no {token} token", fix="use a tokenizer trained by lmforge.tokenizer.train")
    if ids[BOS] != BOS_ID:
        raise InputError(path, f"{BOS} has id {ids[BOS]}, expected {BOS_ID}", fix="re-run the tokenizer stage")
    config_path = tokenizer_dir / CONFIG_FILE
    template = _read_json(config_path).get("chat_template") if config_path.exists() else None
    return {"tokens": tokens, "types": types, "merges": merges, "bos": ids[BOS], "eos": ids[EOS],
            "chat_template": template if isinstance(template, str) else None}


# --- writing -----------------------------------------------------------------------------------

def write_gguf(model: GPT, tokenizer_dir: Path, path: Path, *, dtype: Dtype, name: str = "lmforge",
               extra: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Write `model` and its tokenizer as one GGUF file at `path` (atomically; same bytes every run).

    `extra`: more string metadata (e.g. {"lmforge.base_sha256": ...}); a key may not replace one
    this function writes. Returns {"arch", "dtype", "n_tensors", "bytes", "tensor_types"}.
    """
    if dtype not in _FILE_TYPE:
        raise LmforgeError(f"GGUF dtype {dtype!r} is not one of {', '.join(_FILE_TYPE)}")
    cfg = model.config
    arch = _arch(cfg)
    tok = _tokenizer_fields(Path(tokenizer_dir), cfg.vocab_size)
    w = gguf.GGUFWriter(path=None, arch=arch)
    w.add_name(name)
    w.add_file_type(int(_FILE_TYPE[dtype]))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_vocab_size(cfg.vocab_size)
    w.add_context_length(cfg.max_seq_len)
    w.add_embedding_length(cfg.d_model)
    w.add_block_count(cfg.n_layer)
    w.add_feed_forward_length(cfg.d_mlp)
    w.add_head_count(cfg.n_head)
    w.add_head_count_kv(cfg.n_kv_head)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.norm_eps)
    if arch == "llama":
        w.add_rope_dimension_count(cfg.head_dim)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(PRE_TOKENIZER)
    w.add_token_list(tok["tokens"])
    w.add_token_types(tok["types"])
    w.add_token_merges(tok["merges"])
    w.add_bos_token_id(tok["bos"])
    w.add_eos_token_id(tok["eos"])
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    if tok["chat_template"]:
        w.add_chat_template(tok["chat_template"])
    for key, value in sorted((extra or {}).items()):
        if any(key in kv for kv in w.kv_data):
            raise LmforgeError(f"extra GGUF metadata key {key!r} would replace one write_gguf writes")
        if not isinstance(value, str):
            raise LmforgeError(f"extra GGUF metadata {key!r} must be a string (got {type(value).__name__})")
        w.add_key_value(key, value, gguf.GGUFValueType.STRING)  # add_string would drop ""

    types: dict[str, int] = {}
    for ours, tensor in state_for_save(model).items():
        t = tensor.detach().to(device="cpu", dtype=torch.float32)
        if arch == "llama" and ours.endswith("q_proj.weight"):
            t = _permute(t, cfg.n_head)
        elif arch == "llama" and ours.endswith("k_proj.weight"):
            t = _permute(t, cfg.n_kv_head)
        array = t.contiguous().numpy()
        qtype = _qtype(array, dtype)
        w.add_tensor(gguf_name(ours), gguf.quants.quantize(array, qtype), raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1

    path = Path(path)
    with atomic_path(path) as tmp:
        try:
            w.write_header_to_file(path=tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
    return {"arch": arch, "dtype": dtype, "n_tensors": sum(types.values()), "bytes": path.stat().st_size,
            "tensor_types": dict(sorted(types.items()))}


# --- reading -----------------------------------------------------------------------------------

def _f32(value: float) -> float:
    """A float32 metadata value as the shortest decimal that gives it back (1e-06, not
    9.99999997e-07), which recovers the value written for any usual eps or theta."""
    return float(str(np.float32(value)))


def read_gguf(path: Path) -> tuple[ModelConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """The ModelConfig, the state dict under our names (float32, q/k un-permuted, dequantized;
    no `lm_head.weight` when the head is tied, as `state_for_save`) and every metadata key.

    A file that is not GGUF, has an architecture other than llama/qwen3, lacks a key or holds
    tensors that do not fit the config raises InputError naming the file.
    """
    path = Path(path)
    fix = "re-export it with lmforge.export.gguf.write_gguf"
    try:
        reader = gguf.GGUFReader(path)
        meta = {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}
        raw = [(t.name, t.tensor_type, tuple(int(d) for d in reversed(t.shape.tolist())), np.array(t.data))
               for t in reader.tensors]
        del reader
    except FileNotFoundError:
        raise InputError(path, "not found", fix=fix) from None
    except Exception as e:  # the reader raises ValueError, IndexError, ... on damaged files
        raise InputError(path, f"not a readable GGUF file ({type(e).__name__}: {e})", fix=fix) from None

    arch = meta.get("general.architecture")
    if arch not in ARCHS:
        raise InputError(path, f"unknown architecture {arch!r} (lmforge reads {', '.join(ARCHS)})", fix=fix)

    def get(key: str) -> Any:
        full = key.format(arch=arch)
        if full not in meta:
            raise InputError(path, f"metadata key {full!r} is missing", fix=fix)
        return meta[full]

    tensors: dict[str, torch.Tensor] = {}
    for gname, qtype, shape, data in raw:
        ours = _our_name(gname)
        if ours is None:
            raise InputError(path, f"tensor {gname!r} is not part of an lmforge model", fix=fix)
        try:
            values = gguf.quants.dequantize(data, qtype)
        except NotImplementedError:
            raise InputError(path, f"tensor {gname!r} has type {qtype.name}, which lmforge cannot read",
                             fix="export f32, f16 or q8_0") from None
        tensors[ours] = torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32).reshape(shape))

    n_head = int(get(gguf.Keys.Attention.HEAD_COUNT))
    try:
        cfg = ModelConfig(
            vocab_size=int(meta.get(gguf.Keys.LLM.VOCAB_SIZE.format(arch=arch), len(get(gguf.Keys.Tokenizer.LIST)))),
            n_layer=int(get(gguf.Keys.LLM.BLOCK_COUNT)),
            d_model=int(get(gguf.Keys.LLM.EMBEDDING_LENGTH)),
            n_head=n_head,
            n_kv_head=int(get(gguf.Keys.Attention.HEAD_COUNT_KV)),
            head_dim=int(meta.get(gguf.Keys.Attention.KEY_LENGTH.format(arch=arch),
                                  int(get(gguf.Keys.LLM.EMBEDDING_LENGTH)) // max(n_head, 1))),
            d_mlp=int(get(gguf.Keys.LLM.FEED_FORWARD_LENGTH)),
            max_seq_len=int(get(gguf.Keys.LLM.CONTEXT_LENGTH)),
            rope_theta=_f32(get(gguf.Keys.Rope.FREQ_BASE)),
            norm_eps=_f32(get(gguf.Keys.Attention.LAYERNORM_RMS_EPS)),
            qk_norm=arch == "qwen3",
            tie_embeddings="lm_head.weight" not in tensors,
        )
    except ValueError as e:
        raise InputError(path, f"the metadata is not a valid model config: {e}", fix=fix) from None

    expected = _shapes(cfg)
    if set(tensors) != set(expected):
        missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise InputError(path, f"tensors do not fit the config: missing {missing}, unexpected {unexpected}", fix=fix)
    for ours, shape in expected.items():
        if tuple(tensors[ours].shape) != shape:
            raise InputError(path, f"tensor {gguf_name(ours)!r} has shape {tuple(tensors[ours].shape)}, "
                             f"expected {shape}", fix=fix)
    if arch == "llama":
        for ours in tensors:
            if ours.endswith("q_proj.weight"):
                tensors[ours] = _unpermute(tensors[ours], cfg.n_head)
            elif ours.endswith("k_proj.weight"):
                tensors[ours] = _unpermute(tensors[ours], cfg.n_kv_head)
    ordered = {k: tensors[k] for k in expected}  # state-dict order
    return cfg, ordered, meta


def _shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Every saved tensor of a GPT with `cfg` and its shape, in state-dict order."""
    q, kv = cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, cfg.d_model)}
    for i in range(cfg.n_layer):
        p = f"model.layers.{i}."
        layer = {
            "input_layernorm.weight": (cfg.d_model,),
            "self_attn.q_proj.weight": (q, cfg.d_model),
            "self_attn.k_proj.weight": (kv, cfg.d_model),
            "self_attn.v_proj.weight": (kv, cfg.d_model),
            "self_attn.o_proj.weight": (cfg.d_model, q),
            **({"self_attn.q_norm.weight": (cfg.head_dim,), "self_attn.k_norm.weight": (cfg.head_dim,)}
               if cfg.qk_norm else {}),
            "post_attention_layernorm.weight": (cfg.d_model,),
            "mlp.gate_proj.weight": (cfg.d_mlp, cfg.d_model),
            "mlp.up_proj.weight": (cfg.d_mlp, cfg.d_model),
            "mlp.down_proj.weight": (cfg.d_model, cfg.d_mlp),
        }
        shapes.update({p + k: v for k, v in layer.items()})
    shapes["model.norm.weight"] = (cfg.d_model,)
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (cfg.vocab_size, cfg.d_model)
    return shapes


# --- the read-back check -----------------------------------------------------------------------

def model_from_state(cfg: ModelConfig, state: Mapping[str, torch.Tensor]) -> GPT:
    """A GPT (eval mode, CPU) holding `state` as `read_gguf` returns it."""
    model = GPT(cfg, init=False)
    full = dict(state)
    if cfg.tie_embeddings:
        full["lm_head.weight"] = full["model.embed_tokens.weight"]
    model.load_state_dict(full, strict=True)
    return model.eval()


def default_prompts(cfg: ModelConfig) -> list[list[int]]:
    """Four fixed prompts for the greedy check: <|bos|> then 0, 3, 7 and 15 ids drawn with seed 0,
    each short enough to leave room for the new tokens."""
    g = torch.Generator().manual_seed(0)
    room = max(1, cfg.max_seq_len - GREEDY_TOKENS)
    return [[BOS_ID, *torch.randint(0, cfg.vocab_size, (min(n, room - 1),), generator=g).tolist()]
            for n in (0, 3, 7, 15)]


def _same_config(a: ModelConfig, b: ModelConfig) -> bool:
    """Equal configs, floats compared at float32 (the precision GGUF stores them in)."""
    da, db = a.model_dump(), b.model_dump()
    return all(np.float32(da[k]) == np.float32(db[k]) if isinstance(da[k], float) else da[k] == db[k] for k in da)


def compare(model: GPT, path: Path, *, prompts: Sequence[Sequence[int]] | None = None) -> dict[str, Any]:
    """Read `path` back and compare it with `model`: tensor by tensor, then greedy tokens.

    f32: every tensor must equal ours exactly and greedy generation of 32 tokens from each
    prompt (default `default_prompts`) must give our tokens; otherwise LmforgeError. f16 / q8_0:
    the numbers are reported (max abs diff per tensor, the worst one, prompts with our tokens).
    """
    path = Path(path)
    cfg, state, meta = read_gguf(path)
    dtype = {int(v): k for k, v in _FILE_TYPE.items()}.get(int(meta.get("general.file_type", -1)), "unknown")
    ours = {k: v.detach().to(device="cpu", dtype=torch.float32) for k, v in state_for_save(model).items()}
    if set(ours) != set(state):
        raise LmforgeError(f"{path}: tensors {sorted(set(ours) ^ set(state))} are in only one of the file and the "
                           "model: the file is not an export of this model")
    diffs = {k: float((state[k] - ours[k]).abs().max()) if ours[k].numel() else 0.0 for k in ours}
    identical = sum(torch.equal(state[k], ours[k]) for k in ours)
    worst = max(diffs, key=lambda k: diffs[k])
    config_equal = _same_config(cfg, model.config)

    prompts = [list(p) for p in (prompts if prompts is not None else default_prompts(model.config))]
    read_back = model_from_state(cfg, state).to(model.lm_head.weight.device)
    same: list[bool] = []
    for p in prompts:  # one prompt at a time: no left padding, as llama.cpp runs them
        n = min(GREEDY_TOKENS, model.config.max_seq_len - len(p), cfg.max_seq_len - len(p))
        want = generate(model, [p], n, temperature=0.0, stop_tokens=())[0]
        got = generate(read_back, [p], n, temperature=0.0, stop_tokens=())[0]
        same.append(got == want)

    report = {
        "path": str(path), "arch": meta.get("general.architecture"), "dtype": dtype,
        "config_equal": config_equal, "n_tensors": len(ours), "n_identical": identical,
        "max_abs_diff": diffs[worst], "worst_tensor": worst, "max_abs_diff_by_tensor": diffs,
        "n_prompts": len(prompts), "n_prompts_same_tokens": sum(same), "same_tokens": same,
    }
    if dtype == "f32":
        problems = []
        if not config_equal:
            problems.append(f"config {cfg.model_dump()} != ours {model.config.model_dump()}")
        if identical != len(ours):
            problems.append(f"{len(ours) - identical} of {len(ours)} tensors differ (worst {worst}: {diffs[worst]:.3g})")
        if not all(same):
            problems.append(f"greedy tokens differ for {same.count(False)} of {len(same)} prompts")
        if problems:
            raise LmforgeError(f"{path}: the f32 GGUF does not read back as the model: {'; '.join(problems)}")
    return report
