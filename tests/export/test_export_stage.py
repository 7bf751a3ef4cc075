"""The export stage's own pieces: merging deltas, the parity gate, the model card."""

from __future__ import annotations

import pytest
import torch

from lmforge.errors import LmforgeError
from lmforge.export.card import Card, headline_rows, render
from lmforge.export.stage import _check, merge
from lmforge.forge.delta import applied
from tests.forge.helpers import random_delta, tiny


def test_merged_deltas_compute_what_the_applied_deltas_compute() -> None:
    model = tiny(64, layers=3)
    deltas = [random_delta(model, 1), random_delta(model, 2)]
    x = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), applied(model, deltas):
        hooked = model(x)
    merge(model, deltas)
    with torch.no_grad():
        merged = model(x)
    assert (merged - hooked).abs().max() <= 1e-5


def test_a_parity_failure_stops_the_export_naming_the_runtime() -> None:
    good = {"max_abs_logit_diff": 1e-6, "greedy_same": True, "greedy_same_prompts": 3, "prompts": 3}
    _check({"transformers": good, "onnxruntime": good, "gguf_q8_0": {**good, "greedy_same": False}}, 1e-4)
    with pytest.raises(LmforgeError, match=r"onnxruntime: max abs logit diff 0\.01 > 0\.0001"):
        _check({"transformers": good, "onnxruntime": {**good, "max_abs_logit_diff": 0.01}}, 1e-4)
    with pytest.raises(LmforgeError, match=r"transformers: greedy tokens differ on 1 prompt"):
        _check({"transformers": {**good, "greedy_same": False, "greedy_same_prompts": 2}}, 1e-4)


def test_the_card_states_each_stage_and_cites_the_audit_head() -> None:
    metrics = {"pretrain": {"val_bpb": 1.77451, "unigram_val_bpb": 3.332}, "rl": {"heldout_gain": 0.07,
                                                                               "heldout_gain_se": 0.02}}
    assert ("pretrain", "val bits per byte", "1.775") in headline_rows(metrics)
    assert ("rl", "gain (± s.e.)", "0.07 ± 0.02") in headline_rows(metrics)
    model = tiny(64).config.model_dump(mode="json")
    card = Card(name="t", model=model, n_params=123, architecture="LlamaForCausalLM", files={"model.gguf": "ab"},
                stage_metrics=metrics, sources={"sources": {"kjv": {"records": 3, "licence": "PD", "sha256": "cd"}}},
                facts=None, licences=["PD.txt"], parity={}, deltas="none",
                audit={"chain_id": "c1", "count": 7, "head_hash": "e" * 64, "verified": True}, limits=["small"])
    text = render(card)
    assert f"head `{'e' * 64}` after 7 records" in text and "| kjv | 3 | PD | `cd` |" in text
    assert "- small" in text and "| pretrain | unigram floor (bpb) | 3.332 |" in text
