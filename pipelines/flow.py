"""The Prefect flow `lmforge-pipeline`: dvc.yaml's DAG, one Prefect task per stage.

Run it locally with `make flow` (or `.venv/bin/python -m pipelines.flow [STAGE ...] [--force]`
from the repo root): Prefect starts a temporary server of its own, and every stage runs here.
With a Prefect server configured (PREFECT_API_URL), the deployments of prefect.yaml created
(`prefect --no-prompt deploy --all`) and MLFLOW_TRACKING_URI naming an MLflow server that
workers reach too, stages whose `meta.runner` is `gpu` are sent to the `lmforge-stage/gpu`
deployment, i.e. to a worker of the `gpu` work pool, which needs its own clone and a DVC
remote shared with this workspace (see pipelines/stage_runner.py); the outputs come back
through DVC's run-cache, not by running the stage again here.

Each task runs `dvc repro --single-item <stage>`, so DVC alone decides whether a stage is up
to date and `dvc.lock` comes out the same as under `make run` (`dvc repro`). Prefect's own
result caching is off for that reason. Two `dvc repro` cannot share a workspace, so the
tasks run one after another, upstream first; a stage whose upstream failed is not run.

The workspace's audit chain spans every stage: a stage that ran here appends its own record
(runner `prefect:cpu` under a worker, `prefect:local` in-process); for one a gpu worker ran,
the flow appends a `stage.remote` record once the outputs are back, with their digests and the
hash of the worker's own stage record in the worker clone's chain (read from the anchor that
the worker's stage left on its MLflow run), so this chain names every record it relies on.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.deployments import run_deployment
from prefect.states import State

from lmforge import tracking
from lmforge.digest import sha256_path
from lmforge.errors import ConfigError, LmforgeError
from lmforge.runtime import code_version
from pipelines.dvc_state import heal_torn_rwlock
from pipelines.graph import PlannedStage, plan
from pipelines.proc import (
    StageFailedError,
    dvc_argv,
    dvc_json,
    outcome,
    require_ok,
    run_logged,
    runner_label,
    stage_env,
    tracking_store_is_shared,
)
from stages.dag import audit_log, load_stage, pipeline_config, pipeline_key

FLOW_NAME = "lmforge-pipeline"
GPU_DEPLOYMENT = "lmforge-stage/gpu"  # declared in prefect.yaml, served by the `gpu` work pool
# How long a gpu stage may take on the gpu pool, queueing included, before the flow gives up
# on it (`pipeline(gpu_timeout_s=...)`): long enough for a pretraining stage, short enough
# that a pipeline with no gpu worker online fails the same day instead of waiting for ever.
DEFAULT_GPU_TIMEOUT_S = 6 * 3600.0
# How many times a gpu stage whose flow run crashed (worker lost) is sent again.
DEFAULT_GPU_CRASH_RETRIES = 2


class PipelineFailedError(LmforgeError):
    """At least one stage failed; the message names it, its error, and the stages not run."""


@dataclass(frozen=True)
class Route:
    """Where one stage runs and why (the reason is logged, so a user sees it)."""

    where: Literal["local", "deployment"]
    reason: str
    deployment: str | None = None


def choose_route(
    runner: str,
    api_url: str | None,
    gpu_deployment_exists: bool,
    rev: str | None,
    tracking_uri: str | None,
) -> Route:
    """The routing rule, kept free of I/O so it can be tested on its own.

    A `gpu` stage goes to the GPU deployment only when all of these hold: a Prefect server is
    configured (a temporary local server has no workers), the deployment exists on it, the
    workspace has a git commit the worker can check out, and MLflow tracks to a store the
    worker can reach (`tracking_uri`, i.e. MLFLOW_TRACKING_URI; the stage's run on the worker
    is a child of this pipeline's parent run, which a local SQLite/file store keeps out of
    its reach). Otherwise it runs here.
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
    if not tracking_store_is_shared(tracking_uri):
        store = f"MLFLOW_TRACKING_URI={tracking_uri!r}" if tracking_uri else "MLFLOW_TRACKING_URI is unset"
        return Route(
            "local",
            f"{store}: a local MLflow store that a gpu worker cannot reach, and its stage run must "
            "join this pipeline's parent run; point MLFLOW_TRACKING_URI at a shared MLflow server "
            "(e.g. http://mlflow-host:5000), here and on the gpu workers",
        )
    return Route("deployment", f"sent to deployment '{GPU_DEPLOYMENT}' (work pool 'gpu')", GPU_DEPLOYMENT)


def configured_api_url() -> str | None:
    """PREFECT_API_URL as Prefect resolves it (env or profile); None means ephemeral mode."""
    from prefect.settings import get_current_settings

    url = get_current_settings().api.url
    return str(url) if url else None


def configured_tracking_uri() -> str | None:
    """MLFLOW_TRACKING_URI, which stage processes here and on workers inherit; None when unset
    (lmforge.tracking.configure then uses the workspace's own SQLite store)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or None


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
        run_logged(argv, root, stage_env(runner_label("local"), parent_run_id), log), f"stage '{stage}'"
    )
    return {
        "where": "local",
        "reason": reason,
        "outcome": outcome(stage, result),
        "seconds": round(result.seconds, 3),
    }


def _uncommitted(root: Path) -> list[str]:
    """Tracked files changed since HEAD, except those a run itself rewrites (dvc.lock, which
    the worker is sent separately, and the .gitignore files DVC maintains). A rename or copy
    lists both paths: the worker's commit has the old one and lacks the new one."""
    # -z: paths are NUL-terminated and never quoted (no `"a b"` or `\303\251` escapes), and a
    # rename is `R  new NUL old NUL` instead of the ambiguous `R  old -> new`.
    done = subprocess.run(
        ["git", "status", "--porcelain", "-z", "--untracked-files=no"],
        cwd=root,
        capture_output=True,
        text=True,
        check=False,
    )
    fields = done.stdout.split("\0")
    paths: list[str] = []
    i = 0
    while i < len(fields):
        entry = fields[i]
        i += 1
        if len(entry) < 4:  # the empty string after the last NUL
            continue
        status, path = entry[:2], entry[3:]
        paths.append(path)
        if "R" in status or "C" in status:  # the source path follows as a field of its own
            if i < len(fields) and fields[i]:
                paths.append(fields[i])
            i += 1
    return [p for p in paths if Path(p).name not in ("dvc.lock", ".gitignore")]


def _unfinished_message(
    stage: str, deployment: str, run_name: str, run_id: str, state: State | None, timeout_s: float | None
) -> str:
    """Why a deployment run that run_deployment gave back unfinished fails its stage."""
    limit = f"{timeout_s:g} s (gpu_timeout_s)" if timeout_s is not None else "the time allowed"
    at = f"flow run '{run_name}' ({run_id})"
    if state is not None and state.name == "AwaitingConcurrencySlot":
        # prefect.yaml's concurrency_limit: another run of the deployment held the one slot.
        return (
            f"gpu stage '{stage}': {at} was still waiting after {limit} for the one slot of "
            f"deployment '{deployment}' (concurrency_limit: 1), which another run of it holds; "
            "let that finish (or cancel it) and run again, or raise gpu_timeout_s"
        )
    if state is None or state.is_scheduled() or state.is_pending():
        # Scheduled, Late, Pending: no worker has started it.
        return (
            f"gpu stage '{stage}': no worker of deployment '{deployment}' picked up {at} within {limit} "
            f"(it is {state.name if state else 'without a state'}); start one on a GPU machine "
            "(`prefect worker start --pool gpu`, see prefect.yaml) or raise gpu_timeout_s"
        )
    return (
        f"gpu stage '{stage}': {at} on deployment '{deployment}' did not finish within {limit} "
        f"(it is {state.name}); raise gpu_timeout_s, or None to wait for ever"
    )


def _give_up_on(flow_run_id: UUID | str, state: State | None) -> str:
    """Cancel a deployment run the flow no longer waits for, so it does not run on unobserved
    (and push outputs for a pipeline run already marked failed). Says what was done."""
    from prefect.client.orchestration import get_client
    from prefect.states import Cancelled, Cancelling

    # A run a worker has started is asked to stop (the worker kills it on Cancelling);
    # one that never started is cancelled outright.
    started = state is not None and not (state.is_scheduled() or state.is_pending())
    try:
        with get_client(sync_client=True) as client:
            client.set_flow_run_state(
                flow_run_id,
                Cancelling() if started else Cancelled(message="lmforge-pipeline gave up waiting"),
            )
    except Exception as e:  # the stage fails either way; say how to clean up by hand
        return f"cancelling it failed ({e}): run `prefect flow-run cancel {flow_run_id}`"
    return "cancellation requested" if started else "it was cancelled"


def _repro_on_deployment(
    spec: PlannedStage,
    root: Path,
    force: bool,
    parent_run_id: str | None,
    rev: str,
    route: Route,
    timeout_s: float | None,
    crash_retries: int = 0,
) -> dict[str, Any]:
    """Run the stage on a gpu worker, then take its outputs back through DVC's run-cache. A run
    that ends Crashed (its worker died) is resubmitted up to `crash_retries` times."""
    log = get_run_logger()
    env = stage_env(runner_label("local"), parent_run_id)
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
    for attempt in range(1, crash_retries + 2):
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
            # Queueing included: with no gpu worker online the run stays Scheduled for ever.
            timeout=timeout_s,
        )
        state = child.state
        if state is None or not state.is_crashed() or attempt > crash_retries:
            break
        # Crashed: its process died with its worker or host (marked so by the heartbeat
        # automation), not a stage error. Send it again; on the same worker clone the stage
        # resumes from its last checkpoint.
        log.warning(
            "gpu stage '%s': flow run '%s' (%s) crashed (%s); resubmitting it (retry %d of %d, "
            "gpu_crash_retries); it resumes from the stage's last checkpoint on the worker's clone",
            spec.name, child.name, child.id, state.message or "no message", attempt, crash_retries,
        )
    if state is None or not state.is_final():  # run_deployment returns it when timeout_s runs out
        message = _unfinished_message(
            spec.name, route.deployment, child.name, str(child.id), state, timeout_s
        )
        raise StageFailedError(f"{message}; {_give_up_on(child.id, state)}")
    if not state.is_completed():  # run_deployment does not raise on failure
        raise StageFailedError(
            f"gpu stage '{spec.name}' failed on deployment '{route.deployment}': flow run "
            f"'{child.name}' ({child.id}) ended {state.name}"
            f"{': ' + state.message if state.message else ''}"
            f"{f' (after {attempt - 1} resubmission(s))' if attempt > 1 else ''}; its logs are in the Prefect UI"
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
    else:
        _audit_remote_stage(spec, root, child.id, child.work_pool_name, parent_run_id)
    return {
        "where": "deployment",
        "reason": route.reason,
        "outcome": verdict,
        "seconds": round(result.seconds, 3),
        "flow_run_id": str(child.id),
        "attempts": attempt,
    }


def _worker_record(parent_run_id: str | None, stage: str) -> dict[str, Any] | None:
    """The worker's audit anchor for `stage` in this pipeline run: the newest finished MLflow
    run of the stage under the parent, with the chain id, head hash and count its stage wrapper
    tagged it with (its stage record is that head). None if the worker ran nothing (it found
    the stage in its own run-cache) or tracked elsewhere."""
    import mlflow

    if not parent_run_id:
        return None
    client = mlflow.MlflowClient()
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=(f"tags.mlflow.parentRunId = '{parent_run_id}' and tags.`lmforge.stage` = '{stage}' "
                       "and attributes.status = 'FINISHED'"),
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    if not runs or "audit.head_hash" not in runs[0].data.tags:
        return None
    tags = runs[0].data.tags
    return {"chain_id": tags["audit.chain_id"], "record_hash": tags["audit.head_hash"],
            "count": int(tags["audit.count"]), "mlflow_run_id": runs[0].info.run_id,
            "runner": tags.get("lmforge.runner")}


def _audit_remote_stage(spec: PlannedStage, root: Path, flow_run_id: UUID, pool: str | None,
                        parent_run_id: str | None) -> None:
    """Append a `stage.remote` record to this workspace's chain for a stage a worker ran."""
    worker = _worker_record(parent_run_id, spec.name)
    audit_log(root).append({
        "kind": "stage.remote",
        "stage": spec.name,
        "runner": (worker or {}).get("runner") or f"prefect:{pool or 'gpu'}",
        "flow_run_id": str(flow_run_id),
        "outputs": {o: sha256_path(root / o) for o in load_stage(root, spec.name).all_outs},
        "worker_record": worker,  # None: the worker took the stage from its own run-cache
        "mlflow_run_id": (worker or {}).get("mlflow_run_id"),
    })


@task(name="dvc-stage", task_run_name="{stage}", cache_policy=NO_CACHE, retries=0)
def stage_task(
    stage: str,
    spec: PlannedStage,
    root: str,
    force: bool,
    route: Route,
    parent_run_id: str | None,
    rev: str | None,
    gpu_timeout_s: float | None = DEFAULT_GPU_TIMEOUT_S,
    gpu_crash_retries: int = DEFAULT_GPU_CRASH_RETRIES,
) -> dict[str, Any]:
    """One dvc.yaml stage. The task run carries the stage's name (`task_run_name`).

    `force`: this very stage is re-run even if DVC finds it up to date."""
    log = get_run_logger()
    root_path = Path(root)
    if route.where == "deployment":
        assert rev is not None  # choose_route only sends committed workspaces
        return _repro_on_deployment(spec, root_path, force, parent_run_id, rev, route, gpu_timeout_s,
                                    gpu_crash_retries)
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
    stages: list[str] | None = None,
    force: bool = False,
    root: str = ".",
    retries: int = 0,
    gpu_timeout_s: float | None = DEFAULT_GPU_TIMEOUT_S,
    gpu_crash_retries: int = DEFAULT_GPU_CRASH_RETRIES,
) -> dict[str, dict[str, Any]]:
    """Run dvc.yaml's stages (or `stages` and their upstream), upstream first.

    `force` re-runs the stages named in `stages` (all stages when `stages` is empty) even if
    they are up to date (`dvc repro --single-item --force` on each); their upstream is not
    forced: it runs only if DVC finds it changed (unlike `dvc repro --force STAGE`, which
    forces the upstream too).
    `retries` retries a failed stage task that many times. `gpu_timeout_s` is how long a stage
    sent to the gpu deployment may take, waiting for a worker included, before it fails
    (None: wait for ever), per submission. `gpu_crash_retries`: how many times a gpu stage whose
    flow run ended Crashed (its worker or host died; see pipelines/automations.yaml) is sent
    again; a run that Failed (the stage's own error) is not. Returns, per stage, where it ran and what DVC did
    ('ran' / 'restored' / 'up-to-date').
    """
    import mlflow
    from prefect.runtime import flow_run

    if gpu_timeout_s is not None and gpu_timeout_s <= 0:
        # run_deployment reads 0 as "do not wait", which would fail every gpu stage at once.
        raise ConfigError(
            f"gpu_timeout_s={gpu_timeout_s}: give a number of seconds > 0, or None to wait for ever"
        )
    if gpu_crash_retries < 0:
        raise ConfigError(f"gpu_crash_retries={gpu_crash_retries}: give a whole number >= 0")
    log = get_run_logger()
    root_path = Path(root).resolve()
    heal_torn_rwlock(root_path, log)  # a killed earlier run may have torn it
    order = plan(root_path, stages)
    forced = {s.name for s in order} if not stages else set(stages)
    api_url = configured_api_url()
    tracking_uri = configured_tracking_uri()
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
            route = choose_route(spec.runner, api_url, has_gpu_deployment, rev, tracking_uri)
            # The task takes the stage's name too, so the UI groups a stage's runs across flows.
            runs = stage_task.with_options(name=spec.name, retries=retries)
            # Called, not submitted: each stage finishes before the next starts (DVC's lock).
            # wait_for turns a failed upstream into NotReady here instead of a run.
            states[spec.name] = runs(
                spec.name,
                spec,
                str(root_path),
                force and spec.name in forced,
                route,
                parent,
                rev,
                gpu_timeout_s,
                gpu_crash_retries,
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


def _timeout_arg(text: str) -> float | None:
    if text.strip().lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds or 'none'") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give seconds > 0, or 'none' to wait for ever")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.flow", description=__doc__.split("\n\n")[0])
    parser.add_argument("stages", nargs="*", help="run only these stages and their upstream (default: all)")
    parser.add_argument(
        "--force",
        action="store_true",
        help="re-run the named stages (all when none is named) even if up to date; "
        "their upstream still runs only if changed",
    )
    parser.add_argument("--retries", type=int, default=0, help="retries per failed stage (default 0)")
    parser.add_argument("--root", default=".", help="the DVC repo (default: the current directory)")
    parser.add_argument(
        "--gpu-timeout-s",
        type=_timeout_arg,
        default=DEFAULT_GPU_TIMEOUT_S,
        help=f"seconds a stage sent to the gpu pool may take, queueing included, or 'none' to wait "
        f"for ever (default {DEFAULT_GPU_TIMEOUT_S:g})",
    )
    parser.add_argument("--gpu-crash-retries", type=int, default=DEFAULT_GPU_CRASH_RETRIES,
                        help="resubmissions of a gpu stage whose flow run crashed (its worker died) "
                        f"(default {DEFAULT_GPU_CRASH_RETRIES})")
    args = parser.parse_args(argv)
    try:
        summary = pipeline(
            stages=args.stages or None,
            force=args.force,
            root=args.root,
            retries=args.retries,
            gpu_timeout_s=args.gpu_timeout_s,
            gpu_crash_retries=args.gpu_crash_retries,
        )
    except LmforgeError as e:
        print(f"lmforge-pipeline failed: {e}", file=sys.stderr)
        return 1
    for name, info in summary.items():
        print(f"{name:>14}  {info['where']:<10}  {info['outcome']:<10}  {info['seconds']:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
