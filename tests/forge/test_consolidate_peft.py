"""Consolidation by truncated SVD, and the PEFT adapter's files and key names."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.forge.consolidate import merge
from lmforge.forge.peft import write_adapter
from tests.forge.helpers import random_delta, tiny


def test_merge_is_exact_at_full_rank_and_reports_the_cut() -> None:
    model = tiny(64)
    d1, d2 = random_delta(model, 1, rank=4), random_delta(model, 2, rank=4)
    full, rep = merge([d1, d2], rank=8)
    for n in d1.names:
        assert torch.allclose(full.weight_delta(n), d1.weight_delta(n) + d2.weight_delta(n), atol=1e-5)
    assert max(rep["error"].values()) < 1e-5 and rep["from_ranks"] == 8
    cut, rep = merge([d1, d2], rank=4)
    assert cut.rank == 4 and min(rep["error"].values()) > 0.01  # two random rank-4 deltas need rank 8


def test_peft_adapter_layout_and_key_names(tmp_path: Path) -> None:
    model = tiny(64, layers=3)
    d = random_delta(model, 1, rank=4)  # layers 0..2 (middle band of 3), gate_proj and down_proj
    out = write_adapter(d, tmp_path / "adapter", base_model="data/export/hf")
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["task_type"] == "CAUSAL_LM" and cfg["r"] == 4
    assert cfg["lora_alpha"] == 8 and cfg["target_modules"] == ["down_proj", "gate_proj"]
    assert cfg["layers_to_transform"] == [0, 1, 2] and cfg["bias"] == "none"
    t = load_file(str(out / "adapter_model.safetensors"))
    assert set(t) == {f"base_model.model.model.layers.{i}.mlp.{p}.lora_{ab}.weight"
                      for i in range(3) for p in ("gate_proj", "down_proj") for ab in "AB"}
    a, b = t["base_model.model.model.layers.1.mlp.down_proj.lora_A.weight"], \
        t["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"]
    assert a.shape == (4, 64) and b.shape == (32, 4)  # (r, in) and (out, r), as PEFT stores them
    assert torch.equal(cfg["lora_alpha"] / cfg["r"] * (b @ a), d.weight_delta("model.layers.1.mlp.down_proj"))


def test_peft_loads_the_adapter_on_the_equivalent_transformers_model(tmp_path: Path) -> None:
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from lmforge.forge.delta import applied
    from lmforge.weights import state_for_save

    model = tiny(64, layers=2)
    c = model.config
    hf_cfg = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_mlp,
                                      num_hidden_layers=c.n_layer, num_attention_heads=c.n_head,
                                      num_key_value_heads=c.n_kv_head, head_dim=c.head_dim, rms_norm_eps=c.norm_eps,
                                      rope_theta=c.rope_theta, max_position_embeddings=c.max_seq_len,
                                      tie_word_embeddings=False, attention_bias=False, mlp_bias=False)
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    missing, unexpected = hf.load_state_dict(state_for_save(model), strict=False)
    assert not unexpected and all("rotary" in k for k in missing)
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(x).logits, model(x), atol=1e-4)  # the same architecture
    d = random_delta(model, 1, rank=4)
    write_adapter(d, tmp_path / "adapter")
    with torch.no_grad(), applied(model, [d]):
        ours = model(x)
    peft_model = peft.PeftModel.from_pretrained(hf, str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        theirs = peft_model(x).logits
    assert torch.allclose(theirs, ours, atol=1e-4)
