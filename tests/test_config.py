"""Typed configs: unknown, missing and mistyped keys fail naming the key; profiles merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge.config import StageConfig, build, load_section, read_yaml
from lmforge.data.mix import MixConfig
from lmforge.errors import ConfigError
from lmforge.profiles import apply

ROOT = Path(__file__).resolve().parent.parent

SOURCE = {"name": "a", "path": "x.jsonl", "share": 1.0, "licence": "CC0"}


def test_unknown_key_is_named_with_allowed_keys() -> None:
    with pytest.raises(ConfigError) as e:
        build(MixConfig, {"sources": [SOURCE], "sedd": 1}, "params.yaml: mix")
    msg = str(e.value)
    assert "params.yaml: mix.sedd: unknown key" in msg
    assert "seed" in msg and "sources" in msg


def test_nested_unknown_and_mistyped_keys() -> None:
    bad = {**SOURCE, "shar": 0.5, "share": "half"}
    with pytest.raises(ConfigError) as e:
        build(MixConfig, {"sources": [bad], "filters": {"min_chars": "ten"}}, "params.yaml: mix")
    msg = str(e.value)
    assert "mix.sources[0].shar: unknown key" in msg
    assert "mix.sources[0].share" in msg
    assert "mix.filters.min_chars" in msg


def test_shares_must_sum_to_one() -> None:
    two = [SOURCE | {"share": 0.5}, SOURCE | {"name": "b", "share": 0.4}]
    with pytest.raises(ConfigError, match="sum to 1"):
        build(MixConfig, {"sources": two}, "mix")


def test_config_is_frozen() -> None:
    cfg = build(MixConfig, {"sources": [SOURCE]}, "mix")
    with pytest.raises(Exception, match="frozen"):
        cfg.seed = 3  # type: ignore[misc]


def test_real_params_validate() -> None:
    cfg = load_section(ROOT / "params.yaml", "mix", MixConfig)
    assert abs(sum(s.share for s in cfg.sources) - 1) < 1e-9


def test_profile_apply_merges_keeps_comments_and_rejects_typos(tmp_path: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("# top comment\nmix:\n  seed: 1  # the seed\n  total: 5\ntok:\n  v: 2\n")
    prof = tmp_path / "p.yaml"
    prof.write_text("mix:\n  total: 7\n")
    apply(params, prof)
    text = params.read_text()
    assert "total: 7" in text and "# the seed" in text and "# top comment" in text
    prof.write_text("mix:\n  totl: 7\n")
    before = params.read_text()
    with pytest.raises(ConfigError, match="mix.totl"):
        apply(params, prof)
    assert params.read_text() == before


def test_yaml_is_read_as_dvc_reads_it(tmp_path: Path) -> None:
    """YAML 1.2 (ruamel, as DVC): 3e-4 is a number, `on` is a string, errors name the line."""
    from lmforge.config import read_yaml

    p = tmp_path / "params.yaml"
    p.write_text("a:\n  lr: 3e-4\n  flag: on\n  big: 1.0e5\n")
    assert read_yaml(p) == {"a": {"lr": 0.0003, "flag": "on", "big": 100000.0}}
    p.write_text("a:\n  b: [1, 2\n  c: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: invalid YAML"):
        read_yaml(p)


@pytest.mark.parametrize("profile", sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")))
def test_every_profile_gives_valid_stage_configs(profile: str, tmp_path: Path) -> None:
    """Each shipped profile applies cleanly and every stage section it yields validates; the
    pretrain model it describes is buildable (heads divide the width, and so on)."""
    import importlib

    from stages import dag

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    apply(params, ROOT / "profiles" / f"{profile}.yaml")
    data = read_yaml(params)
    for name in yaml.safe_load((ROOT / dag.DVC_FILE).read_text())["stages"]:
        module = importlib.import_module(f"stages.{name}")  # the stage module imports its config class
        config_cls = next(v for v in vars(module).values()
                          if isinstance(v, type) and issubclass(v, StageConfig) and v is not StageConfig)
        cfg = build(config_cls, data[name], f"{profile}: {name}")
        if name == "pretrain":
            model = cfg.model.build(data["tokenizer"]["vocab_size"], cfg.train.seq_len)
            steps = cfg.train.total_steps(model.n_params())
            assert steps >= 1 and cfg.train.accum_steps(cfg.train.nproc_per_node) >= 1
            if profile == "gpu8":  # the d20 class
                assert 500e6 < model.n_params() < 600e6 and cfg.train.nproc_per_node == 8
