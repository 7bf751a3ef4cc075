"""Parameter groups: every tensor in exactly one group, and clear errors otherwise."""

from __future__ import annotations

import pytest
import yaml

from lmforge.config import build
from lmforge.errors import ConfigError
from lmforge.govern import GovernConfig
from lmforge.model import GPT, ModelConfig
from lmforge.train.groups import GroupSpec, partition
from tests.conftest import ROOT


def gpt(**kw: object) -> GPT:
    return GPT(ModelConfig.from_depth(2, 64, aspect_ratio=32, head_dim=16, max_seq_len=32, **kw))


def specs(*rows: tuple[str, int, list[str]] | tuple[str, int, list[str], bool]) -> list[GroupSpec]:
    return [GroupSpec(name=r[0], level=r[1], patterns=r[2], per_layer=r[3] if len(r) > 3 else False) for r in rows]


def default_specs() -> list[GroupSpec]:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["govern"]
    return list(build(GovernConfig, params, "params.yaml: govern").groups)


def test_the_default_groups_cover_every_tensor_once() -> None:
    model = gpt()
    groups = partition(model, default_specs())
    names = [n for g in groups for n in g.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert len(names) == len(set(names))
    assert [g.name for g in groups] == ["embed", "norms", "attn.0", "attn.1", "mlp.0", "mlp.1", "head"]
    assert {g.name: g.level for g in groups}["mlp.1"] == 2
    assert set(next(g for g in groups if g.name == "attn.1").params) == {
        f"model.layers.1.self_attn.{p}_proj.weight" for p in "qkvo"}


def test_a_tensor_in_no_group_is_named() -> None:
    with pytest.raises(ConfigError, match=r"'lm_head.weight' is in no group"):
        partition(gpt(), specs(("rest", 0, ["model.*"])))


def test_overlapping_groups_are_named() -> None:
    overlapping = specs(("mlp", 1, ["model.layers.*.mlp.*"]), ("layer0", 1, ["model.layers.0.*"]),
                        ("rest", 0, ["lm_head.*", "model.norm.*", "model.embed*", "model.layers.1.*"]))
    with pytest.raises(ConfigError, match=r"'model.layers.0.mlp.gate_proj.weight' is in 2 groups \(mlp, layer0\)"):
        partition(gpt(), overlapping)


def test_a_pattern_matching_nothing_is_named() -> None:
    with pytest.raises(ConfigError, match=r"\(head\): pattern 'output.weight' matches no parameter"):
        partition(gpt(), specs(("all", 0, ["model.*", "lm_head.*"]), ("head", 3, ["output.weight"])))
    # a tied head has no lm_head tensor of its own: its pattern matches nothing, and says so
    with pytest.raises(ConfigError, match=r"pattern 'lm_head.weight' matches no parameter"):
        partition(gpt(tie_embeddings=True), default_specs())


def test_per_layer_needs_block_tensors() -> None:
    with pytest.raises(ConfigError, match=r"per_layer is set but parameter 'model.embed_tokens.weight' is in no block"):
        partition(gpt(), specs(("all", 0, ["*"], True)))


@pytest.mark.parametrize(("group", "message"), [
    ({"name": "x", "level": 4, "patterns": ["*"]}, "level must be 0..3"),
    ({"name": "x", "level": 0, "patterns": []}, "at least one glob"),
    ({"name": "a b", "level": 0, "patterns": ["*"]}, "must be letters"),
])
def test_bad_group_specs(group: dict, message: str) -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["govern"]
    params["groups"] = [group]
    with pytest.raises(ConfigError, match=message):
        build(GovernConfig, params, "params.yaml: govern")
