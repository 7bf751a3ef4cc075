"""The model card (`data/export/README.md`): what the model is, what it was made from, how it
scored at every stage, how to load it, and what it cannot do.

    from lmforge.export.card import render
    text = render(card)        # card: a Card with the facts the export stage gathered

Every number comes from a file the export stage depends on (the stages' metrics.json, the
sources' manifest, the parity checks): the card states, it never estimates.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..tracking import flatten
from .jsonfile import read_object

# Each stage's headline metrics as (label, key in its flattened metrics.json).
HEADLINES: dict[str, list[tuple[str, str]]] = {
    "mix": [("documents kept (train)", "total.train_docs"), ("dropped as near-duplicates", "dropped.near_duplicate"),
            ("dropped as exact duplicates", "dropped.exact_duplicate")],
    "tokenizer": [("vocabulary", "vocab_size"), ("bytes per token", "bytes_per_token"),
                  ("train tokens", "train_tokens")],
    "pretrain": [("val bits per byte", "val_bpb"), ("unigram floor (bpb)", "unigram_val_bpb"),
                 ("tokens seen", "tokens_seen")],
    "govern": [("val loss, governed", "val_loss_governed"), ("val loss, ungoverned", "val_loss_ungoverned"),
               ("gradient work skipped", "skipped_fraction")],
    "sft": [("held-out loss before", "heldout_loss_before"), ("held-out loss after", "heldout_loss_after"),
            ("held-out accuracy after", "heldout_accuracy_after")],
    "rl": [("held-out accuracy, SFT", "heldout_accuracy_sft"), ("held-out accuracy, RL", "heldout_accuracy_rl"),
           ("gain (± s.e.)", "heldout_gain")],
    "forgetting": [("gate passed", "gate.passed"), ("val bpb change vs pretrain", "gate.increase"),
                   ("allowed increase", "gate.max_increase"), ("val bpb of the released model", "retention.rl.val_bpb")],
    "forge": [("efficacy", "efficacy"), ("paraphrase", "paraphrase"), ("locality", "locality"),
              ("plain LoRA locality", "baselines.lora.locality"), ("full fine-tune locality", "baselines.full.locality")],
    # the report's (the card is written by the export stage itself, before these exist)
    "export": [("transformers: max abs logit difference", "parity.transformers.max_abs_logit_diff"),
               ("onnxruntime: max abs logit difference", "parity.onnxruntime.max_abs_logit_diff"),
               ("GGUF f32: tensors identical", "parity.gguf_f32.tensors_identical")],
}


@dataclass
class Card:
    name: str
    model: Mapping[str, Any]            # ModelConfig as JSON
    n_params: int
    architecture: str                   # LlamaForCausalLM / Qwen3ForCausalLM
    files: Mapping[str, str]            # output name -> sha256
    stage_metrics: Mapping[str, Mapping[str, Any]]
    sources: Mapping[str, Any]          # data/sources/manifest.json
    facts: Mapping[str, Any] | None     # data/sources/facts.json
    licences: Sequence[str]
    parity: Mapping[str, Any]
    deltas: str                         # none | adapters | merged
    adapters: Sequence[str] = ()
    audit: Mapping[str, Any] | None = None
    limits: Sequence[str] = field(default_factory=list)


def read_json(path: Path) -> dict[str, Any]:
    return read_object(path, missing="run the stage that writes it (dvc repro)", invalid="re-run the stage that wrote it")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{int(v):,}" if v.is_integer() and abs(v) < 1e15 else f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def headline_rows(stage_metrics: Mapping[str, Mapping[str, Any]]) -> list[tuple[str, str, str]]:
    rows = []
    for stage, keys in HEADLINES.items():
        flat = flatten(stage_metrics.get(stage, {}))
        for label, key in keys:
            if key in flat:
                value = _fmt(flat[key])
                if key == "heldout_gain" and "heldout_gain_se" in flat:
                    value += f" ± {_fmt(flat['heldout_gain_se'])}"
                rows.append((stage, label, value))
    return rows


def _difference(p: Mapping[str, Any]) -> str:
    if "max_abs_logit_diff" in p:
        return f"logits {_fmt(p['max_abs_logit_diff'])}"
    return (f"weights {_fmt(p.get('max_abs_weight_diff', ''))} "
            f"({p.get('tensors_identical', 0)}/{p.get('tensors', 0)} tensors identical)")


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    return [f"| {' | '.join(header)} |", f"|{'---|' * len(header)}", *[f"| {' | '.join(r)} |" for r in rows]]


def render(card: Card) -> str:
    m = card.model
    out = [f"# {card.name}", "",
           f"A {card.n_params:,}-parameter decoder-only language model ({card.architecture} layout) trained by "
           "lmforge's pipeline: data mix with near-duplicate removal, BPE tokenizer, pretraining, governed "
           "continued training, chat SFT, RL (GRPO + DPO), a catastrophic-forgetting gate, knowledge deltas.", "",
           "## Architecture", ""]
    out += _table(["field", "value"], [
        ["architecture", card.architecture], ["parameters", f"{card.n_params:,}"], ["layers", str(m["n_layer"])],
        ["width", str(m["d_model"])], ["heads / KV heads", f"{m['n_head']} / {m['n_kv_head']}"],
        ["head dim", str(m["head_dim"])], ["MLP width (SwiGLU)", str(m["d_mlp"])],
        ["vocabulary", str(m["vocab_size"])], ["context", str(m["max_seq_len"])],
        ["RoPE theta", _fmt(m["rope_theta"])], ["QK-norm", _fmt(m["qk_norm"])],
        ["tied embeddings", _fmt(m["tie_embeddings"])]])
    out += ["", "## Files", ""]
    out += _table(["file", "sha256"], [[f"`{k}`", f"`{v}`"] for k, v in sorted(card.files.items())])
    out += ["", "## Use", "", "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            'tok = AutoTokenizer.from_pretrained("data/export/hf")',
            'model = AutoModelForCausalLM.from_pretrained("data/export/hf")',
            'ids = tok.apply_chat_template([{"role": "user", "content": "What is 7 + 5?"}],',
            '                              add_generation_prompt=True, return_tensors="pt", return_dict=False)',
            "print(tok.decode(model.generate(ids, max_new_tokens=32)[0, ids.shape[1]:]))",
            "```", "",
            "`lmforge serve --model data/export/hf` answers OpenAI-style `/v1/chat/completions`; "
            "`model.gguf` (f32), `model.f16.gguf` and `model.q8_0.gguf` are for llama.cpp; "
            "`model.onnx` is the logits graph for onnxruntime."]
    if card.deltas == "adapters" and card.adapters:
        out += ["", f"Knowledge deltas ship as PEFT LoRA adapters in `hf/adapters/` ({', '.join(card.adapters)}); "
                "load one with `peft.PeftModel.from_pretrained(model, 'data/export/hf/adapters/<id>')`. "
                "They are unrouted there: always on, unlike in lmforge, which applies a delta only to prompts "
                "its router matches (locality)."]
    elif card.deltas == "merged":
        out += ["", "The registered knowledge deltas are merged into these weights (always on: facts are "
                "answered without routing, at the cost of locality)."]
    out += ["", "## Parity with lmforge's own model", ""]
    out += _table(["runtime / file", "max abs difference from ours (fp32)", "same greedy tokens"], [
        [fmt, _difference(p), f"{p.get('greedy_same_prompts', 0)}/{p.get('prompts', 0)} prompts"]
        for fmt, p in sorted(card.parity.items())])
    out += ["", "## Results by stage", ""]
    out += _table(["stage", "metric", "value"], headline_rows(card.stage_metrics))
    out += ["", "## Training data", ""]
    rows = [[name, _fmt(s.get("records", "")), str(s.get("licence", "")), f"`{s.get('sha256', '')}`"]
            for name, s in sorted(card.sources.get("sources", {}).items())]
    if card.facts:
        rows.append(["facts (forge)", _fmt(card.facts.get("records", "")),
                     ", ".join(f"{k}: {v.get('licence', '')}" for k, v in sorted(card.facts.get("upstream", {}).items())),
                     f"`{card.facts.get('sha256', '')}`"])
    out += _table(["source", "records", "licence", "sha256"], rows)
    out += ["", f"Licence texts: {', '.join(f'`LICENSES/{n}`' for n in card.licences)} (in `data/sources/`)."]
    out += ["", "## Audit", ""]
    if card.audit:
        state = "verified intact" if card.audit.get("verified") else "NOT intact (lmforge audit verify says why)"
        out += [f"Audit chain `{card.audit['chain_id']}`: head `{card.audit['head_hash']}` after "
                f"{card.audit['count']} records, {state} when this export ran. The chain only grows: "
                f"`lmforge audit verify` checks it as it is now, and this head is the hash of its record "
                f"{card.audit['count'] - 1} (`lmforge audit show --json`)."]
    else:
        out += ["No audit chain was found when this export ran."]
    out += ["", "## Known limits", "", *[f"- {limit}" for limit in card.limits], ""]
    return "\n".join(out)
