"""The Prefect flow `lmforge-stage`: one dvc.yaml stage on a worker (deployment `lmforge-stage/gpu`).

The pipeline flow (`pipelines/flow.py`) calls it through `run_deployment` for `gpu` stages;
a person can too: `prefect deployment run lmforge-stage/gpu -p stage=pretrain --watch`.

A worker has its OWN git clone of the project (prefect.yaml's pull steps move each flow run
into the directory the worker's LMFORGE_WORKDIR names, read when the run starts) with the
same DVC remote configured as the orchestrating workspace, and an MLFLOW_TRACKING_URI that
reaches the same tracking server (the pipeline only routes here when its own does). The flow:

1. checks out `rev` in that clone (`git fetch` + `git checkout --force --detach rev`; local
   changes in the worker clone are discarded: it belongs to the worker, nobody edits it);
2. writes the orchestrator's current dvc.lock over the commit's one (if given), and moves aside
   a `.dvc/tmp/rwlock` torn by an earlier run killed with its worker (pipelines/dvc_state.py), so that
3. `dvc pull` fetches exactly the inputs the orchestrator pushed, then
4. `dvc repro --pull --single-item <stage>` runs the stage (LMFORGE_RUNNER=prefect:<pool>),
5. `dvc push --run-cache <stage>` sends outputs and the run-cache entry back: the
   orchestrator's `dvc repro --pull --single-item <stage>` then restores instead of re-running.

Run locally for a try: `python -c "from pipelines.stage_runner import run_stage; run_stage('mix', None, None)"`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from prefect import flow, get_run_logger

from lmforge import atomic
from pipelines.dvc_state import heal_torn_rwlock
from pipelines.graph import plan
from pipelines.proc import dvc_argv, outcome, require_ok, run_logged, runner_label, stage_env

FLOW_NAME = "lmforge-stage"


def _checkout(workdir: Path, rev: str, log: Any) -> None:
    env = dict(os.environ)
    have = run_logged(["git", "cat-file", "-e", f"{rev}^{{commit}}"], workdir, env, log)
    if not have.ok:
        require_ok(
            run_logged(["git", "fetch", "--quiet"], workdir, env, log),
            f"fetching commit {rev} into the worker clone {workdir}",
            fix="the worker clone needs a remote it can fetch from",
        )
    require_ok(
        run_logged(["git", "checkout", "--quiet", "--force", "--detach", rev], workdir, env, log),
        f"checking out commit {rev} in the worker clone {workdir}",
        fix="push that commit to the remote the worker clone fetches from",
    )


@flow(name=FLOW_NAME)
def run_stage(
    stage: str,
    rev: str | None = None,
    parent_run_id: str | None = None,
    workdir: str = ".",
    force: bool = False,
    lock: str | None = None,
) -> dict[str, Any]:
    """Reproduce one stage in `workdir` and publish its outputs and run-cache to the DVC remote.

    `rev`: the commit to run (None: whatever `workdir` has checked out). `parent_run_id`: the
    MLflow run of the pipeline. `lock`: the orchestrator's dvc.lock text.
    """
    log = get_run_logger()
    root = Path(workdir).resolve()
    if rev:
        _checkout(root, rev, log)
    if lock is not None:
        atomic.write_text(root / "dvc.lock", lock)
    heal_torn_rwlock(root, log)  # a run of this stage killed with its worker may have torn it
    runner = runner_label("worker")
    env = stage_env(runner, parent_run_id)
    inputs = next(s for s in plan(root, [stage]) if s.name == stage).dep_targets
    if inputs:
        require_ok(
            run_logged(dvc_argv("pull", *inputs), root, env, log),
            f"pulling the inputs of stage '{stage}' ({', '.join(inputs)})",
            fix="the orchestrator pushes them to the default DVC remote; configure the same remote here",
        )
    argv = dvc_argv("repro", "--pull", "--single-item", stage, *(["--force"] if force else []))
    result = require_ok(run_logged(argv, root, env, log), f"stage '{stage}' on {runner}")
    require_ok(
        run_logged(dvc_argv("push", "--run-cache", stage), root, env, log),
        f"pushing the outputs and run-cache of stage '{stage}'",
        fix="configure a default DVC remote shared with the orchestrator",
    )
    return {
        "stage": stage,
        "runner": runner,
        "outcome": outcome(stage, result),
        "seconds": round(result.seconds, 3),
    }
