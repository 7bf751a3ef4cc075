"""Typed configs: unknown, missing and mistyped keys fail naming the key; profiles merge."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge.config import StageConfig, build, load_section, read_yaml
from lmforge.data.mix import MixConfig
from lmforge.errors import ConfigError
from lmforge.profiles import apply
from lmforge.train.config import TrainConfig

ROOT = Path(__file__).resolve().parent.parent

SOURCE = {"name": "a", "path": "x.jsonl", "share": 1.0, "licence": "CC0"}


def test_unknown_key_is_named_with_allowed_keys() -> None:
    with pytest.raises(ConfigError) as e:
        build(MixConfig, {"sources": [SOURCE], "sedd": 1}, "params.yaml: mix")
    msg = str(e.value)
    assert "params.yaml: mix.sedd: unknown key; allowed keys here: " in msg
    assert "seed" in msg and "sources" in msg
    assert msg.endswith("(fix: correct the key's spelling, or remove it)")


def test_nested_unknown_and_mistyped_keys() -> None:
    bad = {**SOURCE, "shar": 0.5, "share": "half"}
    with pytest.raises(ConfigError) as e:
        build(MixConfig, {"sources": [bad], "filters": {"min_chars": "ten"}}, "params.yaml: mix")
    msg = str(e.value)
    assert "mix.sources[0].shar: unknown key" in msg
    assert "mix.sources[0].share" in msg
    assert ("mix.filters.min_chars: Input should be a valid integer "
            "(got 'ten') (fix: give 'min_chars' a value of that kind)") in msg


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


def test_profile_meta_sets_dvc_yaml_placement_and_refuses_anything_else(tmp_path: Path) -> None:
    from stages import dag

    params = tmp_path / "params.yaml"
    params.write_text("mix:\n  total: 5\n")
    dvc_file = tmp_path / "dvc.yaml"
    dvc_file.write_text("stages:\n  mix:\n    cmd: python -m stages.mix  # the stage\n    meta:\n      runner: gpu\n"
                        "  tok:\n    cmd: x\n")
    prof = tmp_path / "p.yaml"
    prof.write_text("mix:\n  total: 7\nmeta:\n  mix: {gpus: 4}\n  tok: {gpus: 2}\n")
    apply(params, prof)
    stages = dag.load_stages(tmp_path)
    assert (stages["mix"].gpus, stages["mix"].runner, stages["tok"].gpus) == (4, "gpu", 2)
    assert "# the stage" in dvc_file.read_text() and "total: 7" in params.read_text()
    before = (params.read_text(), dvc_file.read_text())
    for bad, named in [("meta:\n  mxi: {gpus: 2}\n", "meta.mxi"), ("meta:\n  mix: {runner: cpu}\n", "meta.mix.runner"),
                       ("meta:\n  mix: {gpus: 0}\n", "meta.mix.gpus"), ("mix:\n  total: 1\nmeta:\n  mix: {gpus: two}\n", "two")]:
        prof.write_text(bad)
        with pytest.raises(ConfigError, match=named):
            apply(params, prof)
        assert (params.read_text(), dvc_file.read_text()) == before  # neither file was touched
    dvc_file.write_text("stages:\n  mix:\n    cmd: x\n    meta: {gpus: -1}\n")
    with pytest.raises(ConfigError, match=r"stages.mix.meta.gpus must be a whole number"):
        dag.load_stages(tmp_path)


def test_yaml_is_read_as_dvc_reads_it(tmp_path: Path) -> None:
    """YAML 1.2 (ruamel, as DVC): 3e-4 is a number, `on` is a string, errors name the line."""
    from lmforge.config import read_yaml

    p = tmp_path / "params.yaml"
    p.write_text("a:\n  lr: 3e-4\n  flag: on\n  big: 1.0e5\n")
    assert read_yaml(p) == {"a": {"lr": 0.0003, "flag": "on", "big": 100000.0}}
    p.write_text("a:\n  b: [1, 2\n  c: 3\n")
    with pytest.raises(ConfigError, match=r"params.yaml:\d+: invalid YAML: .* \(fix: correct the YAML at that line"):
        read_yaml(p)


def _train_configs(cfg: object) -> list[TrainConfig]:
    if isinstance(cfg, TrainConfig):
        return [cfg]
    if isinstance(cfg, StageConfig) or hasattr(cfg, "model_fields"):
        return [t for k in type(cfg).model_fields for t in _train_configs(getattr(cfg, k))]
    return []


@pytest.mark.parametrize("profile", sorted(p.stem for p in (ROOT / "profiles").glob("*.yaml")))
def test_every_profile_gives_valid_stage_configs(profile: str, tmp_path: Path) -> None:
    """Each shipped profile applies cleanly and every stage section it yields validates; the
    pretrain model it describes is buildable (heads divide the width, and so on)."""
    import importlib

    from stages import dag

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    dvc_file = tmp_path / "dvc.yaml"
    dvc_file.write_text((ROOT / dag.DVC_FILE).read_text())
    apply(params, ROOT / "profiles" / f"{profile}.yaml")
    data = read_yaml(params)
    stages = dag.load_stages(tmp_path)
    gpus = stages["pretrain"].gpus or 1
    for name in yaml.safe_load((ROOT / dag.DVC_FILE).read_text())["stages"]:
        module = importlib.import_module(f"stages.{name}")  # the stage module imports its config class
        config_cls = next(v for v in vars(module).values()
                          if isinstance(v, type) and issubclass(v, StageConfig) and v is not StageConfig)
        cfg = build(config_cls, data[name], f"{profile}: {name}")
        for train in _train_configs(cfg):  # every training run splits over the stage's processes
            assert train.accum_steps(stages[name].gpus or 1) >= 1, (name, train)
        if name == "pretrain":
            model = cfg.model.build(data["tokenizer"]["vocab_size"], cfg.train.seq_len)
            steps = cfg.train.total_steps(model.n_params())
            assert steps >= 1 and cfg.train.accum_steps(gpus) >= 1
            if profile == "gpu8":  # the d20 class, one process per GPU
                assert 500e6 < model.n_params() < 600e6 and gpus == 8
