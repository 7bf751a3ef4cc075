"""Deltas sit beside the base: applied, they change the output; gone, the output is the base's
bit for bit, and the base's weights never change."""

from __future__ import annotations

import pytest
import torch

from lmforge.forge.delta import Delta, applied, middle_band, targets, weights_sha256
from tests.forge.helpers import random_delta, tiny

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_applied_changes_logits_and_leaving_restores_them_exactly() -> None:
    model = tiny(64)
    x = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    before, digest = model(x), weights_sha256(model)
    d = random_delta(model, 1)
    with applied(model, [d]):
        during = model(x)
        assert weights_sha256(model) == digest
    after = model(x)
    assert not torch.equal(during, before)
    assert torch.equal(after, before)  # no tolerance
    assert weights_sha256(model) == digest
    assert all(not m._forward_hooks for m in model.modules())


def test_composition_adds_each_deltas_weight_change() -> None:
    model = tiny(64)
    x = torch.randint(0, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    d1, d2 = random_delta(model, 1), random_delta(model, 2)
    with applied(model, [d1, d2]):
        both = model(x)
    merged = tiny(64)
    with torch.no_grad():
        mods = dict(merged.named_modules())
        for n in d1.names:
            mods[n].weight += d1.weight_delta(n) + d2.weight_delta(n)
    assert torch.allclose(both, merged(x), atol=1e-5)


def test_fresh_delta_is_a_no_op_and_targets_are_checked() -> None:
    model = tiny(64)
    x = torch.randint(0, 64, (2, 5), generator=torch.Generator().manual_seed(2))
    d = Delta.new(model, targets(model, [1], ["up_proj"]), rank=2, alpha=4, seed=0)
    assert d.names == ["model.layers.1.mlp.up_proj"]
    base = model(x)
    with applied(model, [d]):  # B starts at zero (PEFT's init): training starts from the base
        assert torch.equal(model(x), base)
    assert middle_band(3) == [0, 1, 2] and middle_band(8) == [2, 3, 4, 5] and middle_band(20) == list(range(5, 15))
    with pytest.raises(ValueError, match=r"layers \[5\] do not exist"):
        targets(model, [5], ["up_proj"])
    with pytest.raises(ValueError, match="unknown projections"):
        targets(model, None, ["mlp"])


def test_weights_sha256_sees_a_single_changed_bit() -> None:
    model = tiny(64)
    digest = weights_sha256(model)
    with torch.no_grad():
        w = model.model.layers[0].mlp.up_proj.weight
        w.view(torch.int32)[0, 0] ^= 1
    assert weights_sha256(model) != digest
