"""Model lineage in MLflow: each stage's model a LoggedModel, linked to the models it came from.

A stage whose dvc.yaml `meta.model` names an output gets one LoggedModel per run (name = the
stage, source run = the stage's run), tagged with the output's path and SHA-256 and with the
ids of its parent models. A model input is found by digest: any data dependency whose SHA-256
is the digest of an earlier stage's LoggedModel is one (pretrain's model for govern, ...); it is
recorded on the run as a model input (`log_inputs(models=...)`) and on the new model as a parent.
So from the registered export version the chain walks back export -> forge -> rl -> sft ->
govern -> pretrain through the MLflow client alone:

    from lmforge.lineage import chain
    chain(client, "lmforge", "latest")   # [{stage, model_id, run_id, sha256, path}, ...] oldest first

Weights stay in DVC (the LoggedModel is a pointer with a digest), except for a registered
model, whose files are also logged as the model's artifacts so `models:/<name>@<alias>` can be
downloaded from MLflow alone.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

STAGE, PATH, SHA, PARENTS = "lmforge.stage", "lmforge.path", "lmforge.sha256", "lmforge.parents"


def _client() -> Any:
    import mlflow

    return mlflow.MlflowClient()


def find(experiment_id: str, digest: str) -> str | None:
    """The newest ready LoggedModel with this SHA-256, or None."""
    found = _client().search_logged_models(
        [experiment_id], filter_string=f"tags.`{SHA}` = '{digest}'",
        order_by=[{"field_name": "creation_timestamp", "ascending": False}], max_results=1)
    return found[0].model_id if found else None


def log_model_inputs(experiment_id: str, run_id: str, input_digests: Mapping[str, str]) -> list[str]:
    """Record the inputs that are earlier stages' models as the run's model inputs; their ids."""
    from mlflow.entities import LoggedModelInput

    found = [m for _, d in sorted(input_digests.items()) if (m := find(experiment_id, d)) is not None]
    if found:
        _client().log_inputs(run_id, models=[LoggedModelInput(m) for m in found])
    return found


def log_stage_model(experiment_id: str, run_id: str, stage: str, path: str, digest: str,
                    input_digests: Mapping[str, str], *, artifacts: Path | None = None) -> tuple[str, list[str]]:
    """Create the stage's LoggedModel (its parents found among the inputs by digest), mark the
    parents as the run's model inputs and the model as its output; return (id, parent ids)."""
    from mlflow.entities import LoggedModelOutput, LoggedModelStatus

    client = _client()
    parents = log_model_inputs(experiment_id, run_id, input_digests)
    model = client.create_logged_model(experiment_id, name=stage, source_run_id=run_id, model_type="lmforge",
                                       tags={STAGE: stage, PATH: path, SHA: digest, PARENTS: ",".join(parents)})
    if artifacts is not None:
        client.log_model_artifacts(model.model_id, str(artifacts))
    client.finalize_logged_model(model.model_id, LoggedModelStatus.READY)
    client.log_outputs(run_id, [LoggedModelOutput(model.model_id, step=0)])
    return model.model_id, parents


def register(model_id: str, name: str, alias: str, tags: Mapping[str, str] | None = None) -> str:
    """Register the LoggedModel as a new version of `name`, point `alias` at it; return the version."""
    import mlflow

    version = mlflow.register_model(f"models:/{model_id}", name, tags=dict(tags or {}))
    _client().set_registered_model_alias(name, alias, version.version)
    return str(version.version)


def chain(client: Any, name: str, alias: str) -> list[dict[str, Any]]:
    """The lineage of a registered version, oldest model first: each step is the model's first
    parent, so a linear pipeline reads pretrain -> ... -> export. Other parents (forge's base
    model is also export's input) are listed under `parents` of each step."""
    version = client.get_model_version_by_alias(name, alias)
    steps: list[dict[str, Any]] = []
    # the SQL store leaves model_id empty on versions read back; the source names the model
    model_id: str | None = version.model_id or version.source.removeprefix("models:/")
    seen: set[str] = set()
    while model_id and model_id not in seen:
        seen.add(model_id)
        m = client.get_logged_model(model_id)
        parents = [p for p in m.tags.get(PARENTS, "").split(",") if p]
        steps.append({"stage": m.tags.get(STAGE), "model_id": model_id, "run_id": m.source_run_id,
                      "sha256": m.tags.get(SHA), "path": m.tags.get(PATH), "parents": parents})
        # follow the parent made by the latest stage: the one with the longest own chain
        model_id = max(parents, key=lambda p: _depth(client, p)) if parents else None
    return steps[::-1]


def _depth(client: Any, model_id: str, _memo: dict[str, int] | None = None) -> int:
    memo = {} if _memo is None else _memo
    if model_id not in memo:
        parents = [p for p in client.get_logged_model(model_id).tags.get(PARENTS, "").split(",") if p]
        memo[model_id] = 1 + max((_depth(client, p, memo) for p in parents), default=0)
    return memo[model_id]


def stages(steps: Sequence[Mapping[str, Any]]) -> list[str]:
    return [str(s["stage"]) for s in steps]
