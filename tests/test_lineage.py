"""Model lineage in MLflow: stage models found by digest, linked to their parents, registered
with an alias, and the chain read back through the MLflow client alone."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge import lineage, tracking
from lmforge.errors import ConfigError
from stages import dag

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    return tracking.configure(tmp_path)


def _stage(exp: str, stage: str, digest: str, inputs: dict[str, str], artifacts: Path | None = None) -> str:
    import mlflow

    run = mlflow.MlflowClient().create_run(exp, run_name=stage)
    model_id, _ = lineage.log_stage_model(exp, run.info.run_id, stage, f"data/{stage}/model", digest, inputs,
                                          artifacts=artifacts)
    return model_id


def test_the_registered_version_walks_back_to_pretraining(store: str, tmp_path: Path) -> None:
    import mlflow

    digest = {s: s[0] * 64 for s in ("pretrain", "govern", "sft", "rl", "forge", "export")}
    ids = {"pretrain": _stage(store, "pretrain", digest["pretrain"], {"data/tokenizer/tokens": "t" * 64})}
    for prev, stage in [("pretrain", "govern"), ("govern", "sft"), ("sft", "rl"), ("rl", "forge")]:
        ids[stage] = _stage(store, stage, digest[stage], {f"data/{prev}/model": digest[prev], "data/mix/val": "v" * 64})
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf/config.json").write_text("{}")
    # export reads both the RL model and the forge registry: two parents, one chain
    ids["export"] = _stage(store, "export", digest["export"], {"data/rl/model": digest["rl"],
                                                               "data/forge/registry": digest["forge"]},
                           artifacts=tmp_path / "hf")
    assert lineage.register(ids["export"], "lm", "release") == "1"
    assert lineage.register(ids["export"], "lm", "release") == "2"  # a re-run is a new version; the alias moves
    client = mlflow.MlflowClient()
    steps = lineage.chain(client, "lm", "release")
    assert lineage.stages(steps) == ["pretrain", "govern", "sft", "rl", "forge", "export"]
    assert [s["model_id"] for s in steps] == [ids[s] for s in lineage.stages(steps)]
    assert [s["sha256"] for s in steps] == [digest[s] for s in lineage.stages(steps)]
    assert sorted(steps[-1]["parents"]) == sorted([ids["rl"], ids["forge"]])
    # the run that made each model lists the parents as its model inputs
    export_run = client.get_run(steps[-1]["run_id"])
    assert sorted(m.model_id for m in export_run.inputs.model_inputs) == sorted([ids["rl"], ids["forge"]])
    # the released files can be fetched from MLflow alone
    got = mlflow.artifacts.download_artifacts("models:/lm@release", dst_path=str(tmp_path / "dl"))
    assert (Path(got) / "config.json").read_text() == "{}"


def test_a_digest_no_stage_made_is_not_a_model_input(store: str) -> None:
    import mlflow

    _stage(store, "pretrain", "a" * 64, {})
    run = mlflow.MlflowClient().create_run(store, run_name="forgetting")
    found = lineage.log_model_inputs(store, run.info.run_id, {"data/pretrain/model": "a" * 64, "data/mix/val": "b" * 64})
    assert len(found) == 1 and lineage.find(store, "b" * 64) is None
    assert [m.model_id for m in mlflow.MlflowClient().get_run(run.info.run_id).inputs.model_inputs] == found


@pytest.mark.parametrize(("meta", "message"), [
    ({"runner": "cpu", "model": "data/mix/nope"}, "meta.model 'data/mix/nope' must be one of the stage's outs"),
    ({"runner": "cpu", "register": {"name": "m", "alias": "a"}}, "meta.register needs meta.model"),
    ({"runner": "cpu", "model": "data/mix/train", "register": {"name": "m"}}, "meta.register must be {name:"),
], ids=["model-not-an-output", "register-without-model", "register-without-alias"])
def test_bad_model_meta_in_dvc_yaml_is_named(tmp_path: Path, meta: dict, message: str) -> None:
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    stages["stages"] = {"mix": {**stages["stages"]["mix"], "meta": meta}}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump(stages))
    with pytest.raises(ConfigError, match=rf"dvc\.yaml: stages\.mix\.{message.split(' ')[0]}.*") as e:
        dag.load_stages(tmp_path)
    assert message in str(e.value)
