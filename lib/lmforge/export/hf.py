"""The Hugging Face directory: our model as `LlamaForCausalLM` (or `Qwen3ForCausalLM` with QK-norm).

    from lmforge.export.hf import write_hf, load_any, parity
    write_hf(model, "data/tokenizer/tokenizer", "out/hf")       # config, weights, tokenizer, generation
    AutoModelForCausalLM.from_pretrained("out/hf")              # no custom code: a standard architecture
    model, encoder, info = load_any("out/hf")                   # back into a GPT (or one of our dirs)
    parity(model, "out/hf", prompts)                            # logits diff and greedy tokens vs ours

Our state-dict names are Hugging Face's, so the weights are written as they are; what this
module adds is the architecture's `config.json`, the tokenizer files with the chat template and
`<|assistant_end|>` as the end-of-sequence token, and `generation_config.json` (the sampling
defaults `lmforge chat` uses). Writing is deterministic: sorted JSON, and the weights file
carries only transformers' one `{"format": "pt"}` metadata key.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import tiktoken
import torch
from pydantic import ValidationError
from safetensors.torch import save_file

from ..config import validation_lines
from ..engine import generate
from ..errors import InputError
from ..model import GPT, ModelConfig
from ..tokenizer import BOS_ID, CONFIG_FILE, TOKENIZER_FILE, load_encoder, special_id
from ..weights import (
    FORMAT,
    WEIGHTS_FILE,
    check_tensors,
    load_model,
    load_state,
    state_for_save,
    tokenizer_path,
)
from .jsonfile import read_object

EOS = "<|assistant_end|>"
EOS_IDS = [special_id("assistant_end"), BOS_ID]  # a reply ends; a new document would begin
ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen3": "Qwen3ForCausalLM"}
SAMPLING = {"temperature": 0.7, "top_k": 50}  # `lmforge chat`'s defaults


def architecture(cfg: ModelConfig) -> str:
    """The Hugging Face model type our layout is: Qwen3 has QK-norm, Llama does not."""
    return "qwen3" if cfg.qk_norm else "llama"


def hf_config(cfg: ModelConfig) -> Any:
    """The transformers config object of the matching standard architecture."""
    import transformers

    common = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
                  num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                  head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, max_position_embeddings=cfg.max_seq_len,
                  rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta}, hidden_act="silu",
                  tie_word_embeddings=cfg.tie_embeddings, attention_bias=False, bos_token_id=BOS_ID,
                  eos_token_id=EOS_IDS, pad_token_id=BOS_ID, dtype="float32")
    if cfg.qk_norm:
        return transformers.Qwen3Config(**common, use_sliding_window=False)
    return transformers.LlamaConfig(**common, mlp_bias=False)


def model_config(hf: dict[str, Any], path: Path) -> ModelConfig:
    """Our ModelConfig from a Hugging Face config.json of a Llama or Qwen3 model."""
    kind = hf.get("model_type")
    if kind not in ARCHITECTURES:
        raise InputError(path, f"model_type {kind!r} is not one lmforge reads",
                         fix=f"export a model of type {' or '.join(ARCHITECTURES)} (lmforge's export stage writes one)")
    if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
        raise InputError(path, "biases or a non-SiLU activation: not the lmforge layout", fix="export with lmforge")
    rope = hf.get("rope_parameters") or {"rope_type": "default", "rope_theta": hf.get("rope_theta", 10000.0)}
    if rope.get("rope_type", "default") != "default":
        raise InputError(path, f"rope scaling {rope.get('rope_type')!r} is not supported", fix="use plain RoPE")
    try:
        n_head = hf["num_attention_heads"]
        return ModelConfig(vocab_size=hf["vocab_size"], n_layer=hf["num_hidden_layers"], d_model=hf["hidden_size"],
                           n_head=n_head, n_kv_head=hf.get("num_key_value_heads", n_head),
                           head_dim=hf.get("head_dim") or hf["hidden_size"] // n_head, d_mlp=hf["intermediate_size"],
                           max_seq_len=hf["max_position_embeddings"], rope_theta=float(rope["rope_theta"]),
                           norm_eps=float(hf["rms_norm_eps"]), qk_norm=kind == "qwen3",
                           tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except KeyError as e:
        raise InputError(path, f"missing key {e.args[0]!r}", fix="re-export the model") from None
    except ValidationError as e:  # a value of the wrong type, or a shape the model cannot take
        raise InputError(path, "not a model shape lmforge can build: "
                         + "; ".join(validation_lines(e, ModelConfig, "model")), fix="re-export the model") from None
    except (TypeError, ValueError) as e:  # float() of a non-number, or // of one
        raise InputError(path, f"a shape key is not a number ({e})", fix="re-export the model") from None


def _tokenizer_files(tokenizer_dir: Path, out: Path, max_len: int) -> None:
    shutil.copy2(tokenizer_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    tok_cfg = json.loads((tokenizer_dir / CONFIG_FILE).read_text(encoding="utf-8"))
    tok_cfg.update(eos_token=EOS, pad_token=tok_cfg["bos_token"], model_max_length=max_len)
    (out / CONFIG_FILE).write_text(json.dumps(tok_cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def write_hf(model: GPT, tokenizer_dir: str | Path, out_dir: str | Path) -> dict[str, Any]:
    """Write the Hugging Face directory into `out_dir` (fresh or staging); return its config.json."""
    from transformers import GenerationConfig

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    hf = hf_config(cfg)
    hf.architectures = [ARCHITECTURES[architecture(cfg)]]
    config = json.loads(hf.to_json_string(use_diff=False))
    (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    n_tok = load_encoder(tokenizer_dir).n_vocab
    # a vocabulary padded past the tokenizer's: never sample an id that decodes to nothing
    padded = {"suppress_tokens": list(range(n_tok, cfg.vocab_size))} if cfg.vocab_size > n_tok else {}
    gen = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_IDS, pad_token_id=BOS_ID, do_sample=True,
                           **SAMPLING, **padded)
    (out / "generation_config.json").write_text(
        json.dumps(json.loads(gen.to_json_string(use_diff=True)), indent=2, sort_keys=True) + "\n")
    save_file({k: v.float() for k, v in state_for_save(model).items()}, str(out / WEIGHTS_FILE),
              metadata={"format": "pt"})
    _tokenizer_files(Path(tokenizer_dir), out, cfg.max_seq_len)
    return config


def load_any(model_dir: str | Path, *, device: str | torch.device = "cpu") -> tuple[GPT, tiktoken.Encoding, dict]:
    """A GPT and its encoder from one of our model directories or a Hugging Face export of one."""
    root = Path(model_dir)
    path = root / "config.json"
    meta = read_object(path, missing="point at a model directory (data/rl/model) or an export (data/export/hf)",
                       invalid="re-write the model directory")
    if meta.get("format") == FORMAT:
        model, meta = load_model(root, device=device)
        return model, load_encoder(tokenizer_path(root)), meta
    cfg = model_config(meta, path)
    state = load_state(root / WEIGHTS_FILE)
    if cfg.tie_embeddings:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])
    model = GPT(cfg, init=False)
    check_tensors(root / WEIGHTS_FILE, state, model)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(root / WEIGHTS_FILE, f"tensors do not match config.json: missing {missing}, "
                         f"unexpected {unexpected}", fix="re-export the model")
    return model.to(device).eval(), load_encoder(root), meta


def greedy(model: GPT, prompts: Sequence[Sequence[int]], n: int) -> list[list[int]]:
    """Our greedy tokens with no stop token and no vocabulary cut: the reference every export's
    tokens are compared against."""
    return [generate(model, [p], n, temperature=0.0)[0] for p in prompts]


def parity(model: GPT, hf_dir: str | Path, prompts: Sequence[Sequence[int]], n_tokens: int = 32) -> dict[str, Any]:
    """transformers on the export vs our model, fp32: the max abs logit difference over the
    prompts and whether greedy generation gives the same `n_tokens` tokens."""
    from transformers import AutoModelForCausalLM, GenerationConfig

    # safetensors only: a pytorch_model.bin dropped into the directory would go through torch.load
    hf = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, use_safetensors=True).eval()
    hf.generation_config.eos_token_id = None  # else generate fills it in from the export's file
    plain = GenerationConfig(do_sample=False, max_new_tokens=n_tokens, pad_token_id=BOS_ID)
    diff, same = 0.0, []
    ours = greedy(model, prompts, n_tokens)
    with torch.no_grad():
        for p, mine in zip(prompts, ours, strict=True):
            x = torch.tensor([list(p)])
            diff = max(diff, (hf(x).logits - model(x)).abs().max().item())
            theirs = hf.generate(x, attention_mask=torch.ones_like(x), generation_config=plain)[0, len(p):].tolist()
            same.append(theirs == mine)
    return {"max_abs_logit_diff": diff, "greedy_same": all(same), "greedy_same_prompts": sum(same),
            "prompts": len(prompts), "tokens": n_tokens, "architecture": ARCHITECTURES[architecture(model.config)]}
