"""The release gate's decision, and the forgetting stage's config checks."""

from __future__ import annotations

import pytest

from lmforge.config import build
from lmforge.errors import ConfigError
from lmforge.forgetting.retention import GateConfig, decide, refusal_message
from lmforge.forgetting.stage import ForgettingConfig

TABLE = {
    "pretrain": {"val_bpb": 2.0, "by_source": {"code": 1.0, "drama": 3.0}},
    "rl": {"val_bpb": 2.1, "by_source": {"code": 1.3, "drama": 2.9}},
}


def test_gate_passes_within_the_threshold_and_fails_beyond_it() -> None:
    ok = decide(TABLE, GateConfig(max_increase=0.06))
    assert ok["passed"] and ok["action"] == "pass" and ok["increase"] == pytest.approx(0.05)
    assert ok["kind"] == "forgetting.gate" and ok["breaches"] == []
    bad = decide(TABLE, GateConfig(max_increase=0.04))
    assert not bad["passed"] and bad["action"] == "fail"
    assert "val bpb 2.1000 is +5.00% over pretrain's 2.0000 (limit +4.00%)" in refusal_message(bad)
    assert "forgetting.gate.on_fail: warn" in refusal_message(bad)
    warn = decide(TABLE, GateConfig(max_increase=0.04, on_fail="warn"))
    assert not warn["passed"] and warn["action"] == "warn"


def test_gate_per_source_limit() -> None:
    d = decide(TABLE, GateConfig(max_increase=0.5, max_source_increase=0.2))
    assert not d["passed"] and d["source_increases"] == {"code": pytest.approx(0.3), "drama": pytest.approx(-1 / 30, abs=1e-6)}
    assert d["breaches"] == ["source code: +30.00% (limit +20.00%)"]
    assert decide(TABLE, GateConfig(max_increase=0.5, max_source_increase=0.31))["passed"]


def _cfg(**edits: object) -> ForgettingConfig:
    section: dict[str, object] = {"benchmark": {"methods": [{"name": "ce", "kind": "ce"}],
                                                "train": {"steps": 2, "micro_batch": 2, "global_batch": 2}}}
    for key, value in edits.items():
        part, _, leaf = key.partition("__")
        if leaf:
            section.setdefault(part, {})[leaf] = value  # type: ignore[index]
        else:
            section[part] = value
    return build(ForgettingConfig, section, "params.yaml: forgetting")


def test_config_errors_name_the_key() -> None:
    assert _cfg().gate.model == "rl"
    with pytest.raises(ConfigError, match=r"key 'fraction' belongs to kind replay; remove it"):
        _cfg(benchmark__methods=[{"name": "e", "kind": "ewc", "fraction": 0.5}])
    with pytest.raises(ConfigError, match=r"method names must be unique \(ce repeat\)"):
        _cfg(benchmark__methods=[{"name": "ce", "kind": "ce"}, {"name": "ce", "kind": "replay"}])
    with pytest.raises(ConfigError, match=r"gate.model 'final' is not in retention.models"):
        _cfg(gate={"model": "final"})
    with pytest.raises(ConfigError, match=r"domains must name at least two different mix sources"):
        _cfg(benchmark__domains=["kjv", "kjv"])
    with pytest.raises(ConfigError, match=r"max_increase and max_source_increase must be >= 0"):
        _cfg(gate={"max_increase": -0.1})
    with pytest.raises(ConfigError, match=r"params.yaml: forgetting.benchmark.methods\[0\].kind"):
        _cfg(benchmark__methods=[{"name": "x", "kind": "magic"}])


def test_full_mode_replaces_the_budget() -> None:
    quick = _cfg()
    assert quick.benchmark.budget()[0].steps == 2 and quick.benchmark.budget()[1] == [1, 2, 3]
    full = _cfg(benchmark__mode="full", benchmark__full={"steps": 7, "seeds": [4], "eval_rows": 5})
    train, seeds, rows = full.benchmark.budget()
    assert (train.steps, seeds, rows) == (7, [4], 5) and train.seq_len == full.benchmark.train.seq_len
