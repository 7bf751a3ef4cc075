"""Deltas as PEFT LoRA adapters: `adapter_config.json` + `adapter_model.safetensors`.

    write_adapter(delta, "out/adapter", base_model="data/export/hf")

lmforge's module names are Hugging Face Llama's (`model.layers.1.mlp.down_proj`), so PEFT's
keys are `base_model.model.<module>.lora_A.weight` (rank x in) and `...lora_B.weight`
(out x rank), and the scale is `lora_alpha / r`, as in lmforge. Load it with
`peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(hf_dir), adapter_dir)`.
The export stage writes the matching Hugging Face model directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_path
from .delta import Delta

PEFT_TYPE = "LORA"


def adapter_config(delta: Delta, base_model: str | None) -> dict[str, object]:
    projections = sorted({n.rsplit(".", 1)[1] for n in delta.names})
    layers = sorted({int(n.split(".")[2]) for n in delta.names})
    full = {f"model.layers.{i}.{n.split('.')[3]}.{p}" for i in layers for n in delta.names for p in projections
            if n.endswith("." + p)}
    if full != set(delta.names):
        raise ValueError("PEFT's target_modules x layers_to_transform cannot express this delta's modules "
                         f"exactly: {delta.names}")
    return {
        "peft_type": PEFT_TYPE, "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": delta.rank, "lora_alpha": delta.alpha, "lora_dropout": 0.0, "bias": "none",
        "target_modules": projections, "layers_to_transform": layers, "layers_pattern": None,
        "fan_in_fan_out": False, "inference_mode": True, "init_lora_weights": True, "use_rslora": False,
        "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {}, "revision": None,
    }


def adapter_tensors(delta: Delta) -> dict[str, object]:
    out = {}
    for n in delta.names:
        a, b = delta.factors(n)
        out[f"base_model.model.{n}.lora_A.weight"] = a.detach().contiguous()
        out[f"base_model.model.{n}.lora_B.weight"] = b.detach().contiguous()
    return out


def write_adapter(delta: Delta, out_dir: str | Path, *, base_model: str | None = None) -> Path:
    out = Path(out_dir)
    with atomic_path(out) as tmp:
        tmp.mkdir(parents=True)
        save_file(adapter_tensors(delta), str(tmp / "adapter_model.safetensors"), metadata={"format": "pt"})
        (tmp / "adapter_config.json").write_text(json.dumps(adapter_config(delta, base_model), indent=2,
                                                            sort_keys=True) + "\n")
    return out
