"""Prefect flows that drive dvc.yaml's DAG stage by stage on the right runner.

- `pipelines.flow` — flow `lmforge-pipeline`: one task per stage, `make flow` runs it locally.
- `pipelines.stage_runner` — flow `lmforge-stage`: one stage on a worker (the gpu pool).
- `pipelines.graph` — the stage order, read from dvc.yaml with DVC's Python API.
- `pipelines.proc` — the one helper that runs `dvc` with live, logged output.

prefect.yaml at the repo root declares the deployments of both flows.
"""
