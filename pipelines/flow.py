"""The Prefect flow `lmforge-pipeline`: dvc.yaml's DAG, one Prefect task per stage.

Run it locally with `make flow` (or `.venv/bin/python -m pipelines.flow [STAGE ...] [--force]`
from the repo root): Prefect starts a temporary server of its own, and every stage runs here.
With a Prefect server configured (PREFECT_API_URL) and the deployments of prefect.yaml
created (`prefect --no-prompt deploy --all`), stages whose `meta.runner` is `gpu` are sent to
the `lmforge-stage/gpu` deployment, i.e. to a worker of the `gpu` work pool, which needs its
own clone and a DVC remote shared with this workspace (see pipelines/stage_runner.py); the
outputs come back through DVC's run-cache, not by running the stage again here.

Each task runs `dvc repro --single-item <stage>`, so DVC alone decides whether a stage is up
to date and `dvc.lock` comes out the same as under `make run` (`dvc repro`). Prefect's own
result caching is off for that reason. Two `dvc repro` cannot share a workspace, so the
tasks run one after another, upstream first; a stage whose upstream failed is not run.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.states import State

from lmforge import tracking
from lmforge.errors import LmforgeError
from lmforge.runtime import code_version
from pipelines.graph import PlannedStage, plan
from pipelines.proc import (
    StageFailedError,
    dvc_argv,
    dvc_json,
    outcome,
    require_ok,
    run_logged,
    stage_env,
)
from stages.dag import pipeline_config, pipeline_key

FLOW_NAME = "lmforge-pipeline"
GPU_DEPLOYMENT = "lmforge-stage/gpu"  # declared in prefect.yaml, served by the `gpu` work pool
LOCAL_RUNNER = "prefect:local"


class PipelineFailedError(LmforgeError):
    """At least one stage failed; the message names it, its error, and the stages not run."""


@dataclass(frozen=True)
class Route:
    """Where one stage runs and why (the reason is logged, so a user sees it)."""

    where: Literal["local", "deployment"]
    reason: str
    deployment: str | None = None


def choose_route(runner: str, api_url: str | None, gpu_deployment_exists: bool, rev: str | None) -> Route:
    """The routing rule, kept free of I/O so it can be tested on its own.

    A `gpu` stage goes to the GPU deployment only when all of these hold: a Prefect server is
    configured (a temporary local server has no workers), the deployment exists on it, and
    the workspace has a git commit the worker can check out. Otherwise it runs here.
    """
    if runner != "gpu":
        return Route("local", f"{runner} stage")
    if not api_url:
        return Route(
            "local",
            "no Prefect server configured (PREFECT_API_URL is unset), so there is no gpu work pool; "
            "set PREFECT_API_URL and run `prefect --no-prompt deploy --all` to use one",
        )
    if not gpu_deployment_exists:
        return Route(
            "local",
            f"no deployment '{GPU_DEPLOYMENT}' on {api_url}; create it with `prefect --no-prompt deploy --all`",
        )
    if not rev:
        return Route("local", "the workspace has no git commit for a gpu worker to check out; commit first")
    return Route("deployment", f"sent to deployment '{GPU_DEPLOYMENT}' (work pool 'gpu')", GPU_DEPLOYMENT)


def configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect resolves it (env or profile); None means ephemeral mode."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def gpu_deployment_exists(name: str = GPU_DEPLOYMENT) -> bool:
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_deployment_by_name(name)
        except ObjectNotFound:
            return False
    return True


def _repro_locally(
    stage: str, root: Path, force: bool, parent_run_id: str | None, reason: str
) -> dict[str, Any]:
    log = get_run_logger()
    argv = dvc_argv("repro", "--single-item", stage, *(["--force"] if force else []))
    result = require_ok(
        run_logged(argv, root, stage_env(LOCAL_RUNNER, parent_run_id), log), f"stage '{stage}'"
    )
    return {
        "where": "local",
        "reason": reason,
        "outcome": outcome(stage, result),
        "seconds": round(result.seconds, 3),
    }


def _uncommitted(root: Path) -> list[str]:
    """Tracked files changed since HEAD, except those a run itself rewrites (dvc.lock, which
    the worker is sent separately, and the .gitignore files DVC maintains)."""
    done = subprocess.run(
        ["git", "status", "--porcelain", "--untracked-files=no"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    paths = [line[3:] for line in done.stdout.splitlines() if len(line) > 3]
    return [p for p in paths if Path(p).name not in ("dvc.lock", ".gitignore")]


def _repro_on_deployment(
    spec: PlannedStage, root: Path, force: bool, parent_run_id: str | None, rev: str, route: Route
) -> dict[str, Any]:
    """Run the stage on a gpu worker, then take its outputs back through DVC's run-cache."""
    log = get_run_logger()
    env = stage_env(LOCAL_RUNNER, parent_run_id)
    if not force and dvc_json(["status", "--json", spec.name], root, env) == {}:
        # DVC has nothing to do for it here: do not wake a GPU worker to be told so.
        return _repro_locally(spec.name, root, force, parent_run_id, "up to date; not sent to the gpu pool")
    no_remote_fix = (
        "gpu workers exchange data with this workspace through a DVC remote: "
        "configure one they share (`dvc remote add -d NAME URL`)"
    )
    if spec.dep_targets:
        # The worker pulls the inputs this run has just produced; they must be on the remote.
        require_ok(
            run_logged(dvc_argv("push", *spec.dep_targets), root, env, log),
            f"pushing the inputs of gpu stage '{spec.name}'",
            fix=no_remote_fix,
        )
    changed = _uncommitted(root)
    if changed:
        log.warning(
            "gpu stage '%s': the worker runs commit %s, which lacks your uncommitted changes to %s; "
            "commit (and push) them, or its result will not match here and the stage re-runs locally.",
            spec.name,
            rev,
            ", ".join(changed),
        )
    lock = root / "dvc.lock"
    assert route.deployment is not None
    child = run_deployment(
        route.deployment,
        parameters={
            "stage": spec.name,
            "rev": rev,
            "parent_run_id": parent_run_id,
            "force": force,
            # The commit's dvc.lock predates what this run produced upstream; the worker needs
            # the current one to pull the right inputs.
            "lock": lock.read_text(encoding="utf-8") if lock.exists() else None,
        },
    )
    state = child.state
    if state is None or not state.is_completed():  # run_deployment does not raise on failure
        raise StageFailedError(
            f"gpu stage '{spec.name}' failed on deployment '{route.deployment}': flow run "
            f"'{child.name}' ({child.id}) ended {state.name if state else 'without a state'}"
            f"{': ' + state.message if state and state.message else ''}; its logs are in the Prefect UI"
        )
    result = require_ok(
        run_logged(dvc_argv("repro", "--pull", "--single-item", spec.name), root, env, log),
        f"fetching the outputs of gpu stage '{spec.name}'",
        fix=no_remote_fix,
    )
    verdict = outcome(spec.name, result)
    if verdict == "ran":
        log.warning(
            "gpu stage '%s' ran again here: the worker's run-cache entry did not match this workspace. "
            "Check that its outputs are not `cache: false`/`persist: true`/`always_changed` and that "
            "params and code are committed (the worker ran commit %s).",
            spec.name,
            rev,
        )
    return {
        "where": "deployment",
        "reason": route.reason,
        "outcome": verdict,
        "seconds": round(result.seconds, 3),
        "flow_run_id": str(child.id),
    }


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=0)
def stage_task(
    stage: str,
    spec: PlannedStage,
    root: str,
    force: bool,
    route: Route,
    parent_run_id: str | None,
    rev: str | None,
) -> dict[str, Any]:
    """One dvc.yaml stage. The task run carries the stage's name (`task_run_name`)."""
    log = get_run_logger()
    root_path = Path(root)
    if route.where == "deployment":
        assert rev is not None  # choose_route only sends committed workspaces
        return _repro_on_deployment(spec, root_path, force, parent_run_id, rev, route)
    if spec.runner == "gpu":
        log.warning("gpu stage '%s' runs locally: %s", stage, route.reason)
    return _repro_locally(stage, root_path, force, parent_run_id, route.reason)


def _failure_message(states: dict[str, State]) -> str | None:
    failed, not_run = [], []
    for name, state in states.items():
        if state.is_completed():
            continue
        if state.is_pending():  # NotReady: an upstream stage failed, this one never started
            not_run.append(name)
            continue
        err = state.result(raise_on_failure=False)
        failed.append(
            str(err) if isinstance(err, BaseException) else f"stage '{name}': {state.name}: {state.message}"
        )
    if not failed and not not_run:
        return None
    parts = failed
    if not_run:
        parts.append(f"not run because an upstream stage failed: {', '.join(not_run)}")
    return "\n".join(parts)


@flow(name=FLOW_NAME)
def pipeline(
    stages: list[str] | None = None, force: bool = False, root: str = ".", retries: int = 0
) -> dict[str, dict[str, Any]]:
    """Run dvc.yaml's stages (or `stages` and their upstream), upstream first.

    `force` forces each selected stage (`dvc repro --force`); `retries` retries a failed stage
    task that many times. Returns, per stage, where it ran and what DVC did
    ('ran' / 'restored' / 'up-to-date').
    """
    import mlflow
    from prefect.runtime import flow_run

    log = get_run_logger()
    root_path = Path(root).resolve()
    order = plan(root_path, stages)
    api_url = configured_api_url()
    has_gpu_deployment = bool(api_url) and any(s.runner == "gpu" for s in order) and gpu_deployment_exists()
    rev = code_version(root_path)["commit"]
    log.info("stages in order: %s", ", ".join(s.name for s in order))

    experiment = tracking.configure(root_path, pipeline_config(root_path).mlflow_experiment)
    parent = tracking.create_parent(
        experiment, pipeline_key(root_path), driver="prefect", tags={"prefect.flow_run_id": str(flow_run.id)}
    )
    status = "KILLED"  # unless one of the outcomes below is reached (e.g. Ctrl-C)
    try:
        states: dict[str, State] = {}
        for spec in order:
            route = choose_route(spec.runner, api_url, has_gpu_deployment, rev)
            # The task takes the stage's name too, so the UI groups a stage's runs across flows.
            runs = stage_task.with_options(name=spec.name, retries=retries)
            # Called, not submitted: each stage finishes before the next starts (DVC's lock).
            # wait_for turns a failed upstream into NotReady here instead of a run.
            states[spec.name] = runs(
                spec.name,
                spec,
                str(root_path),
                force,
                route,
                parent,
                rev,
                wait_for=[states[u] for u in spec.upstream],
                return_state=True,
            )
        problem = _failure_message(states)
        if problem:
            status = "FAILED"
            raise PipelineFailedError(problem)
        summary = {name: state.result() for name, state in states.items()}
        status = "FINISHED"
        return summary
    except Exception:
        status = "FAILED"
        raise
    finally:
        mlflow.MlflowClient().set_terminated(parent, status)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flow", description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*", help="run only these stages and their upstream (default: all)")
    parser.add_argument("--force", action="store_true", help="re-run the selected stages even if up to date")
    parser.add_argument("--retries", type=int, default=0, help="retries per failed stage (default 0)")
    parser.add_argument("--root", default=".", help="the DVC repo (default: the current directory)")
    args = parser.parse_args(argv)
    try:
        summary = pipeline(stages=args.stages or None, force=args.force, root=args.root, retries=args.retries)
    except LmforgeError as e:
        print(f"lmforge-pipeline failed: {e}", file=sys.stderr)
        return 1
    for name, info in summary.items():
        print(f"{name:>14}  {info['where']:<10}  {info['outcome']:<10}  {info['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
