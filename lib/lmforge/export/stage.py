"""The `export` stage: the released model in the formats users run, each proven against ours.

Inputs: the RL model (released by the forgetting gate), the forge registry and its PEFT
adapters, every stage's metrics.json and the sources' manifest (for the card). Outputs under
data/export/:

    hf/               Hugging Face directory (config, weights, tokenizer + chat template,
                      generation config; hf/adapters/<id>/ with `deltas: adapters`)
    model.gguf        GGUF f32 (every tensor byte-identical to ours on read-back)
    model.f16.gguf    GGUF f16
    model.q8_0.gguf   GGUF q8_0 (2-D weights; norms stay f32)
    model.onnx        logits graph, dynamic batch and sequence
    README.md         the model card
    metrics.json      every parity check

Parity on the fixed prompts of `parity` (text prompts and chat turns): transformers and
onnxruntime logits within `parity.tolerance` of ours in fp32 and the same `parity.tokens`
greedy tokens; GGUF f32 tensors identical and the model read back from it gives the same
greedy tokens. A check that fails fails the stage: a broken export is never published.
`deltas`: `adapters` ships the registered deltas as PEFT adapters beside the unchanged weights,
`merged` adds them into the weights (always on: no routing, so no locality), `none` ignores them.
The stage runner registers `hf/` in the MLflow model registry (dvc.yaml `meta.register`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import Field

from ..chat import prompt_ids
from ..config import Config, StageConfig, non_empty
from ..context import RunContext
from ..digest import sha256_path
from ..engine import encode_prompt
from ..errors import LmforgeError, Refused
from ..forge.delta import Delta, weights_sha256
from ..forge.registry import Registry
from ..model import GPT
from ..weights import load_model, tokenizer_path
from . import gguf, hf, onnx
from .card import Card, read_json, render

STAGES = ("mix", "tokenizer", "pretrain", "govern", "sft", "rl", "forgetting", "forge")
GGUF_FILES = {"f32": "model.gguf", "f16": "model.f16.gguf", "q8_0": "model.q8_0.gguf"}


class ParityConfig(Config):
    prompts: Annotated[list[str], non_empty("text prompt")] = [
        "Once upon a time", "The capital of France is", "def fibonacci(n):", "In the beginning"]
    chat: list[str] = ["What is 7 + 5?"]     # user turns, rendered with the chat template
    tokens: int = Field(32, ge=1)            # greedy tokens compared per prompt
    tolerance: float = Field(1e-4, gt=0)     # max abs logit difference in fp32


class ExportConfig(StageConfig):
    name: str = Field("lmforge", min_length=1)     # the model card's title and GGUF general.name
    deltas: Literal["none", "adapters", "merged"] = "adapters"
    onnx_opset: int = Field(18, ge=17)
    parity: ParityConfig = ParityConfig()


def merge(model: GPT, deltas: Sequence[Delta]) -> None:
    """Add the deltas into the weights, W += scale B A: the model then computes what it computes
    with every delta applied (forced on, no routing)."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for d in deltas:
            for module in d.names:
                w = params[f"{module}.weight"]
                w += d.weight_delta(module).to(w.dtype)


def _limits(model: GPT, metrics: Mapping[str, Mapping[str, Any]], deltas: str) -> list[str]:
    pre, rl = metrics.get("pretrain", {}), metrics.get("rl", {})
    out = [f"A small research model: {model.config.n_params():,} parameters, {pre.get('tokens_seen', 0):,} "
           "pretraining tokens. It continues text and answers in the chat format, but it is not a useful assistant.",
           "Its data is public-domain and permissively licensed English (literature, scripture, speeches, Python "
           "documentation and code, generated arithmetic): other languages and topics are out of distribution.",
           "No safety or refusal training: outputs are unfiltered.",
           f"Context of {model.config.max_seq_len} tokens: it never saw longer sequences (lmforge's own tools refuse "
           "them; other runtimes may not)."]
    if "heldout_accuracy_rl" in rl:
        out.append(f"Arithmetic word problems: {rl['heldout_accuracy_rl']:.1%} held-out accuracy after RL "
                   f"(SFT: {rl.get('heldout_accuracy_sft', 0):.1%}).")
    if deltas == "adapters":
        out.append("The knowledge adapters have no router outside lmforge: applied with PEFT they are always on "
                   "and change answers to unrelated prompts too (see forge's plain-LoRA locality).")
    out.append("The ONNX graph has no KV cache: generation through it recomputes the sequence for every token.")
    return out


def _prompts(cfg: ParityConfig, model_dir: Path) -> list[list[int]]:
    from ..tokenizer import load_encoder

    enc = load_encoder(tokenizer_path(model_dir))
    return [encode_prompt(enc, p) for p in cfg.prompts] + [prompt_ids(enc, [("user", c)]) for c in cfg.chat]


def _check(parity: Mapping[str, Mapping[str, Any]], tol: float) -> None:
    bad = []
    for fmt, p in parity.items():
        if "max_abs_logit_diff" in p and fmt in ("transformers", "onnxruntime") and p["max_abs_logit_diff"] > tol:
            bad.append(f"{fmt}: max abs logit diff {p['max_abs_logit_diff']:.3g} > {tol:g}")
        if fmt in ("transformers", "onnxruntime", "gguf_f32") and not p["greedy_same"]:
            bad.append(f"{fmt}: greedy tokens differ on {p['prompts'] - p['greedy_same_prompts']} prompt(s)")
    if bad:
        raise LmforgeError("export parity failed, nothing published: " + "; ".join(bad)
                           + " (fix: this is a bug in the export of this architecture; please report it)")


def _gguf_parity(report: Mapping[str, Any]) -> dict[str, Any]:
    """The read-back figures in the shape of the other formats' (the f32 check raised if it failed)."""
    return {"max_abs_weight_diff": report["max_abs_diff"], "tensors_identical": report["n_identical"],
            "tensors": report["n_tensors"], "greedy_same": report["n_prompts_same_tokens"] == report["n_prompts"],
            "greedy_same_prompts": report["n_prompts_same_tokens"], "prompts": report["n_prompts"]}


def _rounded(p: Mapping[str, Any]) -> dict[str, Any]:
    return {k: float(f"{v:.3g}") if isinstance(v, float) else v for k, v in p.items()}


def run(cfg: ExportConfig, inputs: Mapping[str, str | Path], out_dir: str | Path,
        ctx: RunContext | None = None) -> dict[str, Any]:
    ctx = ctx or RunContext()
    out = Path(out_dir)
    metrics = {s: read_json(Path(inputs[f"{s}/metrics.json"])) for s in STAGES}
    gate = metrics["forgetting"].get("gate", {})
    if not gate.get("passed"):
        raise Refused(f"the forgetting gate did not release the model ({gate}); nothing is exported")
    model_dir = Path(inputs["rl/model"])
    model, _ = load_model(model_dir)
    base_sha256 = weights_sha256(model)  # the model the deltas were forged on, before any merge
    registry = Registry(Path(inputs["forge/registry"]), base_sha256=base_sha256)
    adapters: list[str] = []
    if cfg.deltas == "merged":
        entries = registry.entries()
        merge(model, [e.delta for e in entries])
        adapters = [e.id for e in entries]
    hf_dir = out / "hf"
    hf.write_hf(model, tokenizer_path(model_dir), hf_dir)
    if cfg.deltas == "adapters":
        adapters = registry.ids()
        for i in adapters:
            shutil.copytree(Path(inputs["forge/adapters"]) / i, hf_dir / "adapters" / i)
    prompts = _prompts(cfg.parity, model_dir)
    parity = {"transformers": hf.parity(model, hf_dir, prompts, cfg.parity.tokens)}
    for dtype, name in GGUF_FILES.items():
        gguf.write_gguf(model, tokenizer_path(model_dir), out / name, dtype=dtype, name=cfg.name,
                        extra={"lmforge.base_sha256": base_sha256})
        parity[f"gguf_{dtype}"] = _gguf_parity(gguf.compare(model, out / name, prompts=prompts))
    onnx.write_onnx(model, out / "model.onnx", opset=cfg.onnx_opset)
    parity["onnxruntime"] = onnx.parity(model, out / "model.onnx", prompts, cfg.parity.tokens)
    _check(parity, cfg.parity.tolerance)
    files = {f"hf/{p.relative_to(hf_dir).as_posix()}": sha256_path(p) for p in sorted(hf_dir.rglob("*"))
             if p.is_file()}
    files.update({name: sha256_path(out / name) for name in [*GGUF_FILES.values(), "model.onnx"]})
    card = Card(name=cfg.name, model=model.config.model_dump(mode="json"), n_params=model.config.n_params(),
                architecture=hf.ARCHITECTURES[hf.architecture(model.config)], files=files, stage_metrics=metrics,
                sources=read_json(Path(inputs["sources/manifest.json"])),
                facts=read_json(Path(inputs["sources/facts.json"])),
                licences=sorted(p.name for p in Path(inputs["sources/LICENSES"]).iterdir()),
                parity=parity, deltas=cfg.deltas, adapters=adapters, audit=ctx.audit,
                limits=_limits(model, metrics, cfg.deltas))
    (out / "README.md").write_text(render(card), encoding="utf-8")
    return {"architecture": card.architecture, "n_params": card.n_params, "deltas": cfg.deltas,
            "adapters": adapters, "parity": {k: _rounded(v) for k, v in parity.items()},
            "bytes": {name: (out / name).stat().st_size for name in [*GGUF_FILES.values(), "model.onnx"]}}
