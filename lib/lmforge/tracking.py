"""MLflow tracking: one parent run per pipeline run, one child run per stage run.

The store is `sqlite:///<root>/mlflow.db` unless MLFLOW_TRACKING_URI says otherwise.
A driver that owns the pipeline run (the Prefect flow) creates the parent and passes its
id to stage processes in LMFORGE_PARENT_RUN_ID. Under a plain `dvc repro` each stage finds
the parent by a pipeline key (git commit + params digest): it joins the newest dvc-driven
parent with that key unless that parent already has a run of this very stage, in which case
this is a new pipeline run and gets a new parent.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

PARENT_ENV = "LMFORGE_PARENT_RUN_ID"
EXPERIMENT = "lmforge"
_BATCH = 900  # log_batch accepts up to 1000 metrics per call


def configure(root: str | Path, experiment: str = EXPERIMENT) -> str:
    """Point MLflow at the project store and experiment; return the experiment id."""
    import mlflow

    root = Path(root).resolve()
    given = os.environ.get("MLFLOW_TRACKING_URI")  # read first: set_tracking_uri exports it
    mlflow.set_tracking_uri(given or f"sqlite:///{root / 'mlflow.db'}")
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        return exp.experiment_id
    # Artifacts next to the DB by default (the sqlite store has no artifact root of its own).
    location = None if given else (root / "mlruns").as_uri()
    return client.create_experiment(experiment, artifact_location=location)


def create_parent(experiment_id: str, key: str, driver: str, tags: Mapping[str, str] | None = None) -> str:
    import mlflow

    client = mlflow.MlflowClient()
    all_tags = {"lmforge.role": "pipeline", "lmforge.pipeline_key": key, "lmforge.driver": driver}
    all_tags.update(tags or {})
    run = client.create_run(experiment_id, tags=all_tags, run_name=f"pipeline-{key[:12]}")
    return run.info.run_id


def find_or_create_parent(experiment_id: str, key: str, stage: str, tags: Mapping[str, str] | None = None) -> str:
    """The parent run a `dvc repro`-driven stage belongs to (see the module docstring)."""
    import mlflow

    client = mlflow.MlflowClient()
    found = client.search_runs(
        [experiment_id],
        filter_string=(
            f"tags.`lmforge.pipeline_key` = '{key}' and tags.`lmforge.role` = 'pipeline' "
            "and tags.`lmforge.driver` = 'dvc'"
        ),
        max_results=1,
        order_by=["attributes.start_time DESC"],
    )
    if found:
        parent = found[0].info.run_id
        done = client.search_runs(
            [experiment_id],
            filter_string=f"tags.`mlflow.parentRunId` = '{parent}' and tags.`lmforge.stage` = '{stage}'",
            max_results=1,
        )
        if not done:
            return parent
    return create_parent(experiment_id, key, driver="dvc", tags=tags)


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': 1}} -> {'a.b': 1}; lists are indexed."""
    out: dict[str, Any] = {}
    if isinstance(value, Mapping):
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(value, list | tuple):
        for i, v in enumerate(value):
            out.update(flatten(v, f"{prefix}.{i}"))
    else:
        out[prefix] = value
    return out


def numeric(metrics: Mapping[str, Any]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in flatten(metrics).items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }


def log_metrics(run_id: str, metrics: Mapping[str, Any], step: int = 0) -> None:
    """Batched: one SQLite round trip per ~900 values, not one per value."""
    import time

    import mlflow
    from mlflow.entities import Metric

    client = mlflow.MlflowClient()
    now = int(time.time() * 1000)
    items = [Metric(k, v, now, step) for k, v in numeric(metrics).items()]
    for i in range(0, len(items), _BATCH):
        client.log_batch(run_id, metrics=items[i : i + _BATCH], synchronous=True)


class MetricBuffer:
    """Step metrics collected in memory and written in batches (one SQLite write per ~900)."""

    def __init__(self, run_id: str, size: int = _BATCH):
        self.run_id, self.size = run_id, size
        self._items: list[Any] = []

    def add(self, metrics: Mapping[str, Any], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self._items.extend(Metric(k, v, now, step) for k, v in numeric(metrics).items())
        if len(self._items) >= self.size:
            self.flush()

    def flush(self) -> None:
        import mlflow

        client = mlflow.MlflowClient()
        for i in range(0, len(self._items), _BATCH):
            client.log_batch(self.run_id, metrics=self._items[i : i + _BATCH], synchronous=True)
        self._items = []


def log_params(run_id: str, params: Mapping[str, Any]) -> None:
    import mlflow
    from mlflow.entities import Param

    client = mlflow.MlflowClient()
    items = [Param(k, str(v)[:6000]) for k, v in flatten(params).items()]
    for i in range(0, len(items), 100):
        client.log_batch(run_id, params=items[i : i + 100], synchronous=True)


@contextmanager
def child_run(experiment_id: str, parent_run_id: str, stage: str, tags: Mapping[str, str]) -> Iterator[str]:
    """A stage's run under the pipeline's parent; ended FAILED if the body raises."""
    import mlflow

    with mlflow.start_run(
        experiment_id=experiment_id,
        parent_run_id=parent_run_id,
        run_name=stage,
        tags={"lmforge.role": "stage", "lmforge.stage": stage, **tags},
    ) as run:
        yield run.info.run_id


def log_input_digests(inputs: Mapping[str, str], context: str = "input") -> None:
    """Record each input path and its SHA-256 as an MLflow dataset input of the active run."""
    import mlflow
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource

    for source, digest in sorted(inputs.items()):
        ds = MetaDataset(LocalArtifactDatasetSource(source), name=source, digest=digest[:36])
        mlflow.log_input(ds, context=context, tags={"sha256": digest})


def set_tags(run_id: str, tags: Mapping[str, str]) -> None:
    import mlflow

    client = mlflow.MlflowClient()
    for k, v in tags.items():
        client.set_tag(run_id, k, v)


def set_status(run_id: str, status: str) -> None:
    """End a run that no `with mlflow.start_run()` owns (e.g. the pipeline parent)."""
    import mlflow

    mlflow.MlflowClient().set_terminated(run_id, status)


def log_artifact(run_id: str, path: str | Path) -> None:
    """A file, or a directory's files under the directory's name."""
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.MlflowClient().log_artifacts(run_id, str(path), artifact_path=path.name)
    else:
        mlflow.MlflowClient().log_artifact(run_id, str(path))


def latest_audit_anchor(root: str | Path, chain_id: str, experiment: str = EXPERIMENT) -> tuple[int, str] | None:
    """The longest head (count, hash) of audit chain `chain_id` anchored on the experiment's runs.

    Stages tag their run and the pipeline parent with the chain id and head after each append;
    the largest count is the newest head this store has seen of that chain: a second copy of
    head.json that a rewrite of the log directory does not reach. Reads only: no store or
    experiment is created. None if there is none.
    """
    import mlflow

    root = Path(root).resolve()
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        if not (root / "mlflow.db").exists():
            return None
        uri = f"sqlite:///{root / 'mlflow.db'}"
    client = mlflow.MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    runs = client.search_runs([exp.experiment_id], filter_string=f"tags.`audit.chain_id` = '{chain_id}'",
                              max_results=50_000)
    anchors = [(int(r.data.tags["audit.count"]), r.data.tags["audit.head_hash"]) for r in runs
               if "audit.head_hash" in r.data.tags and "audit.count" in r.data.tags]
    return max(anchors) if anchors else None
