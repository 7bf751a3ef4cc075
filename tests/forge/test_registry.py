"""The registry: all-or-nothing adds, refusals (wrong base, overlapping subspace, no capacity),
tamper checks on load, and removal."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from lmforge.errors import InputError
from lmforge.forge.delta import Delta, weights_sha256
from lmforge.forge.registry import Policy, Registry, RegistryRefused, overlap
from lmforge.forge.router import Key
from tests.forge.helpers import random_delta, tiny

KEY = Key(torch.eye(4, 32)[:2], torch.tensor([1, 2]))


def _fields(base: str) -> dict[str, object]:
    return {"category": "test", "facts": [{"subject": "Zed"}], "base_sha256": base,
            "metrics": {"efficacy": 1.0, "paraphrase": 1.0, "locality": 1.0}, "created": "2026-11-23T00:00:00+00:00",
            "provenance": {"by": "test"}}


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture
def setup(tmp_path: Path):  # type: ignore[no-untyped-def]
    model = tiny(64)
    base = weights_sha256(model)
    return model, base, Registry(tmp_path / "reg", base_sha256=base, policy=Policy(max_overlap=0.5, capacity=0.5))


def test_add_load_remove_roundtrip(setup) -> None:  # type: ignore[no-untyped-def]
    model, base, reg = setup
    d = random_delta(model, 1)
    e = reg.add(d, KEY, _fields(base))
    assert reg.ids() == [e.id] and e.id.startswith("test-")
    m = json.loads((reg.root / e.id / "manifest.json").read_text())
    assert {"id", "facts", "targets", "rank", "base_sha256", "metrics", "created", "provenance"} <= set(m)
    back = reg.load(e.id)
    for n in d.names:
        assert torch.equal(back.delta.weight_delta(n), d.weight_delta(n))
    assert torch.equal(back.key.vectors, KEY.vectors)
    assert reg.usage() == {n: 4 for n in d.names}
    reg.remove(e.id)
    assert reg.ids() == [] and not list(reg.root.iterdir())


def test_refuses_a_delta_for_another_base_and_changes_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    model, base, reg = setup
    reg.add(random_delta(model, 1), KEY, _fields(base))
    before = _snapshot(reg.root)
    other = weights_sha256(tiny(64, seed=9))
    with pytest.raises(RegistryRefused, match="forged on base"):
        reg.add(random_delta(model, 2), KEY, _fields(other))
    assert _snapshot(reg.root) == before


def test_refuses_an_overlapping_delta_and_changes_nothing(setup) -> None:  # type: ignore[no-untyped-def]
    model, base, reg = setup
    d = random_delta(model, 1)
    reg.add(d, KEY, _fields(base))
    before = _snapshot(reg.root)
    # the same output subspace (B), read through other input directions (A): overlap 1
    twin = Delta.from_tensors({k: (v if k.endswith("lora_B") else v.flip(1)) for k, v in d.tensors().items()}, 4, 8)
    assert min(overlap(d, twin).values()) > 0.99
    with pytest.raises(RegistryRefused, match="overlaps registered delta"):
        reg.add(twin, KEY, _fields(base))
    assert _snapshot(reg.root) == before
    # an unrelated random delta overlaps about rank/out, well below the threshold
    assert max(overlap(d, random_delta(model, 7)).values()) < 0.5


def test_capacity_per_module_is_enforced(setup) -> None:  # type: ignore[no-untyped-def]
    model, base, reg = setup  # capacity 0.5 x min(64, 32) = 16 ranks per module
    for seed in (1, 2):
        reg.add(random_delta(model, seed, rank=8), KEY, _fields(base))
    with pytest.raises(RegistryRefused, match="no capacity on"):
        reg.add(random_delta(model, 3, rank=8), KEY, _fields(base))
    assert len(reg.ids()) == 2


def test_tampered_tensor_file_and_incomplete_manifest_are_clear_errors(setup) -> None:  # type: ignore[no-untyped-def]
    model, base, reg = setup
    e = reg.add(random_delta(model, 1), KEY, _fields(base))
    tensors = reg.root / e.id / "delta.safetensors"
    data = bytearray(tensors.read_bytes())
    data[-1] ^= 0xFF
    tensors.write_bytes(bytes(data))
    with pytest.raises(InputError, match="delta.safetensors: SHA-256 .* does not match the manifest"):
        reg.load(e.id)
    manifest = reg.root / e.id / "manifest.json"
    m = json.loads(manifest.read_text())
    del m["base_sha256"], m["created"]
    manifest.write_text(json.dumps(m))
    with pytest.raises(InputError, match="manifest lacks field.s. base_sha256, created"):
        reg.load(e.id)
    before = _snapshot(reg.root)
    with pytest.raises(InputError, match="manifest lacks"):  # a damaged registry refuses adds, unchanged
        reg.add(random_delta(model, 2), KEY, _fields(base))
    assert _snapshot(reg.root) == before


def test_a_delta_forged_on_another_base_fails_to_load(setup, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    model, base, reg = setup
    e = reg.add(random_delta(model, 1), KEY, _fields(base))
    elsewhere = Registry(reg.root, base_sha256=weights_sha256(tiny(64, seed=5)))
    with pytest.raises(InputError, match="was forged on base"):
        elsewhere.load(e.id)
    with pytest.raises(InputError, match="no delta 'nope'"):
        reg.remove("nope")
