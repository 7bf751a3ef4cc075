"""The forge section of params.yaml: the shipped one and every profile validate; bad values
name the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge.config import ConfigError, build
from lmforge.forge.stage import ForgeConfig

ROOT = Path(__file__).resolve().parents[2]


def test_bad_forge_params_name_the_key() -> None:
    params = yaml.safe_load((ROOT / "params.yaml").read_text())["forge"]
    cfg = build(ForgeConfig, params, "params.yaml: forge")
    assert cfg.lifecycle().gate == cfg.gate and cfg.input_paths() == ["data/sources/facts.jsonl.gz"]
    params["facts"]["per_delta"] = 0
    params["gate"]["paraphrase"] = 1.5
    params["router"]["top_k"] = 0
    with pytest.raises(ConfigError) as e:
        build(ForgeConfig, params, "params.yaml: forge")
    msg = str(e.value)
    assert "params.yaml: forge.facts.per_delta: Input should be greater than or equal to 1 (got 0)" in msg
    assert "forge.gate.paraphrase: a gate threshold is a share of prompts, within [0, 1] (got 1.5)" in msg
    assert "forge.router.top_k" in msg
