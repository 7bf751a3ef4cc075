"""The Prefect flow drives dvc.yaml like `dvc repro` does: same order, same dvc.lock, same skips.

Run: `.venv/bin/python -m pytest -q tests/test_flow.py` (about 50 s on 2 cores: one Prefect
test server, ~10 s, plus DVC's ~1 s start-up per command). Everything happens in tmp dirs:
toy git+DVC repos of three stages (the middle one `meta.runner: gpu`), a Prefect test server
with its own database and PREFECT_HOME, one MLflow SQLite store. The gpu route is tested
without a worker process: the deployment call is replaced by the worker flow run in-process
on a second clone that shares only git and a DVC remote with the first.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import TaskRun
from prefect.settings import (
    PREFECT_HOME,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    temporary_settings,
)
from prefect.states import Failed
from prefect.testing.utilities import prefect_test_harness

from lmforge.errors import ConfigError
from pipelines import flow as flow_mod
from pipelines.flow import GPU_DEPLOYMENT, choose_route, pipeline
from pipelines.graph import plan
from pipelines.proc import StageFailedError, outcome, require_ok, run_logged, stage_env
from pipelines.stage_runner import run_stage
from stages.dag import pipeline_key

# One script for every toy stage: appends "<stage> <LMFORGE_RUNNER>" to calls.log (outside
# DVC's outs, git-ignored) so a test can count command runs, then writes its outs + metrics.
STEP = """\
import json, os, sys
name = sys.argv[1]
dep = sys.argv[2] if len(sys.argv) > 2 and not sys.argv[2].startswith("--") else None
with open("calls.log", "a") as f:
    f.write(name + " " + os.environ.get("LMFORGE_RUNNER", "-") + "\\n")
if "--fail" in sys.argv:
    sys.exit(name + ": boom, the toy stage was told to fail")
text = (open(dep).read() if dep else "") + name
with open(name + ".txt", "w") as f:
    f.write(text)
with open(name + ".json", "w") as f:
    json.dump({"chars": len(text)}, f)
"""

STAGES = ("prep", "train", "report")  # dvc.yaml order = topological order


def _dvc_yaml(fail: str | None) -> str:
    lines = ["stages:"]
    previous = None
    for name in STAGES:
        args = f" {previous}.txt" if previous else ""
        args += " --fail" if name == fail else ""
        deps = ["step.py"] + ([f"{previous}.txt"] if previous else [])
        lines += [
            f"  {name}:",
            f"    cmd: python step.py {name}{args}",
            f"    deps: [{', '.join(deps)}]",
            f"    outs: [{name}.txt]",
            f"    metrics: [{name}.json]",
        ]
        if name == "train":
            lines.append("    meta: {runner: gpu, gpus: 1}")
        previous = name
    return "\n".join(lines) + "\n"


def _env() -> dict[str, str]:
    return stage_env("test", None)  # the venv's python first on PATH, DVC analytics off


def _sh(args: list[str], cwd: Path) -> str:
    done = subprocess.run(args, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{args} failed in {cwd}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def _dvc(*args: str, cwd: Path) -> str:
    return _sh([sys.executable, "-m", "dvc", *args], cwd)


def make_repo(path: Path, fail: str | None = None, remote: Path | None = None) -> Path:
    path.mkdir(parents=True)
    _sh(["git", "init", "-q"], path)
    _sh(["git", "config", "user.email", "test@lmforge.invalid"], path)
    _sh(["git", "config", "user.name", "lmforge test"], path)
    _dvc("init", "-q", cwd=path)
    if remote is not None:  # .dvc/config, not dvc.lock: the lock stays comparable
        _dvc("remote", "add", "-q", "-d", "shared", str(remote), cwd=path)
    (path / "step.py").write_text(STEP)
    (path / "dvc.yaml").write_text(_dvc_yaml(fail))
    (path / "params.yaml").write_text("toy: {seed: 0}\n")
    (path / ".gitignore").write_text("calls.log\n")
    _sh(["git", "add", "-A"], path)
    _sh(["git", "commit", "-q", "-m", "toy pipeline"], path)
    return path


def calls(repo: Path) -> list[str]:
    log = repo / "calls.log"
    return log.read_text().splitlines() if log.exists() else []


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """One Prefect test server (~10-20 s to start) with its database and PREFECT_HOME in tmp.

    Session-scoped; move it to tests/conftest.py when a second module needs Prefect."""
    home = tmp_path_factory.mktemp("prefect-home")
    with (
        temporary_settings(updates={PREFECT_HOME: home, PREFECT_SERVER_ANALYTICS_ENABLED: False}),
        prefect_test_harness(server_startup_timeout=90),
    ):
        yield


@pytest.fixture(scope="module")
def reference_lock(tmp_path_factory: pytest.TempPathFactory) -> str:
    """dvc.lock as the other driver, a plain `dvc repro`, writes it for the toy repo."""
    clean = make_repo(tmp_path_factory.mktemp("reference") / "clean")
    _dvc("repro", cwd=clean)
    return (clean / "dvc.lock").read_text()


@pytest.fixture(scope="module")
def mlflow_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One MLflow SQLite store for the module (creating its tables costs ~2 s); tests find
    their parent run by its flow run id or pipeline key."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_TRACKING_URI", uri)
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        # tracking.configure() sets MLflow's process-wide URI; put the old one back afterwards
        # so later tests do not write into this module's deleted store.
        mp.setattr(mlflow.tracking._tracking_service.utils, "_tracking_uri", None)
        yield uri


def task_runs(flow_run_id: str) -> list[TaskRun]:
    with get_client(sync_client=True) as client:
        runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
    return sorted(runs, key=lambda r: r.created)


def parent_run(tag: str, value: str) -> mlflow.entities.Run:
    client = mlflow.MlflowClient()
    found = client.search_runs(
        [client.get_experiment_by_name("lmforge").experiment_id], filter_string=f"tags.`{tag}` = '{value}'"
    )
    assert len(found) == 1, f"expected one parent run with {tag}={value}, got {len(found)}"
    return found[0]


# --- routing (no I/O) -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("runner", "api_url", "exists", "rev", "where", "reason_has"),
    [
        ("cpu", "http://x/api", True, "abc", "local", "cpu stage"),
        ("gpu", None, True, "abc", "local", "PREFECT_API_URL"),
        ("gpu", "http://x/api", False, "abc", "local", f"no deployment '{GPU_DEPLOYMENT}'"),
        ("gpu", "http://x/api", True, None, "local", "no git commit"),
        ("gpu", "http://x/api", True, "abc", "deployment", GPU_DEPLOYMENT),
    ],
)
def test_choose_route(
    runner: str, api_url: str | None, exists: bool, rev: str | None, where: str, reason_has: str
) -> None:
    route = choose_route(runner, api_url, exists, rev)
    assert route.where == where
    assert reason_has in route.reason
    assert route.deployment == (GPU_DEPLOYMENT if where == "deployment" else None)


def test_stage_tasks_never_use_prefect_caching() -> None:
    # DVC alone decides what is up to date; a Prefect cache hit would skip `dvc repro`.
    assert flow_mod.stage_task.with_options(name="x", retries=2).cache_policy is NO_CACHE


# --- the plan, the subprocess helper -----------------------------------------------------


def test_plan_follows_dvc_graph_and_dvc_yaml_order(tmp_path: Path) -> None:
    repo = tmp_path / "plan"
    repo.mkdir()
    _dvc("init", "-q", "--no-scm", cwd=repo)
    # 'zeta' and 'alpha' are independent: their order must come from dvc.yaml, not the alphabet;
    # 'join' is declared first yet depends on both.
    (repo / "dvc.yaml").write_text(
        "stages:\n"
        "  join: {cmd: cat z a > j, deps: [z, a], outs: [j]}\n"
        "  zeta: {cmd: echo z > z, outs: [z], meta: {runner: gpu}}\n"
        "  alpha: {cmd: echo a > a, outs: [a]}\n"
        "  lone: {cmd: echo l > l, outs: [l]}\n"
    )
    order = plan(repo)
    assert [s.name for s in order] == ["zeta", "alpha", "join", "lone"]
    join = order[2]
    assert join.upstream == ("alpha", "zeta") and join.dep_targets == ("alpha", "zeta")
    assert order[0].runner == "gpu" and order[1].runner == "cpu"
    assert [s.name for s in plan(repo, ["join"])] == ["zeta", "alpha", "join"]
    with pytest.raises(ConfigError, match="no stage named 'nope'.*join, zeta, alpha, lone"):
        plan(repo, ["nope"])


def test_run_logged_streams_lines_and_failure_names_stderr_tail(tmp_path: Path) -> None:
    import logging

    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    log = logging.getLogger("test_flow.run_logged")
    log.addHandler(Keep())
    log.setLevel(logging.INFO)
    code = (
        "import sys; print(\"Running stage 's':\"); print('out line', flush=True); "
        "[sys.stderr.write(f'err {i}\\n') for i in range(60)]; sys.exit(3)"
    )
    result = run_logged([sys.executable, "-c", code], tmp_path, _env(), log)
    assert result.returncode == 3
    assert "out line" in seen and "err 59" in seen
    assert result.stderr_tail[-1] == "err 59" and len(result.stderr_tail) == 40
    assert outcome("s", result) == "ran"
    with pytest.raises(StageFailedError, match=r"stage 's' failed: .* exited 3(.|\n)*err 59") as err:
        require_ok(result, "stage 's'")
    assert "err 19" not in str(err.value)  # only the tail, not the whole stream


# --- the flow on a toy repo ------------------------------------------------------------


def test_flow_matches_dvc_repro_and_skips_when_up_to_date(
    tmp_path: Path, prefect_server: None, mlflow_store: str, reference_lock: str
) -> None:
    repo = make_repo(tmp_path / "flow")

    state = pipeline(root=str(repo), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    flow_run_id = str(state.state_details.flow_run_id)

    runs = task_runs(flow_run_id)
    assert [r.name for r in runs] == list(STAGES)
    assert all(r.state is not None and r.state.is_completed() for r in runs)
    for before, after in zip(runs, runs[1:], strict=False):  # one at a time, upstream first
        assert before.end_time is not None and after.start_time is not None
        assert before.end_time <= after.start_time
    # The test server is up but has no gpu deployment, so the gpu stage ran here.
    assert summary["train"]["where"] == "local"
    assert f"no deployment '{GPU_DEPLOYMENT}'" in summary["train"]["reason"]
    assert {s: i["outcome"] for s, i in summary.items()} == dict.fromkeys(STAGES, "ran")
    assert calls(repo) == [f"{s} prefect:local" for s in STAGES]
    assert (repo / "report.txt").read_text() == "preptrainreport"
    assert json.loads(_dvc("status", "--json", cwd=repo)) == {}

    # The other driver, plain `dvc repro` on an identical clean repo, wrote the same dvc.lock.
    assert (repo / "dvc.lock").read_text() == reference_lock

    parent = parent_run("prefect.flow_run_id", flow_run_id)
    assert parent.info.status == "FINISHED"
    assert parent.data.tags["lmforge.role"] == "pipeline"
    assert parent.data.tags["lmforge.driver"] == "prefect"

    # Second run: DVC finds everything up to date, so no stage command runs.
    mtimes = {s: (repo / f"{s}.txt").stat().st_mtime_ns for s in STAGES}
    again = pipeline(root=str(repo))
    assert {s: i["outcome"] for s, i in again.items()} == dict.fromkeys(STAGES, "up-to-date")
    assert calls(repo) == [f"{s} prefect:local" for s in STAGES]
    assert {s: (repo / f"{s}.txt").stat().st_mtime_ns for s in STAGES} == mtimes


def test_failing_stage_fails_flow_and_skips_downstream(
    tmp_path: Path, prefect_server: None, mlflow_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    repo = make_repo(tmp_path / "failing", fail="train")

    # Through the CLI entry point (`make flow`): exit code and message.
    assert flow_mod.main(["--root", str(repo)]) == 1
    err = capsys.readouterr().err
    assert "stage 'train' failed" in err
    assert "train: boom, the toy stage was told to fail" in err  # the stage's own stderr
    assert "not run because an upstream stage failed: report" in err

    assert calls(repo) == ["prep prefect:local", "train prefect:local"]
    assert not (repo / "report.txt").exists()
    parent = parent_run("lmforge.pipeline_key", pipeline_key(repo))
    assert parent.info.status == "FAILED"
    states = {r.name: r.state for r in task_runs(parent.data.tags["prefect.flow_run_id"])}
    assert states["prep"] is not None and states["prep"].is_completed()
    assert states["train"] is not None and states["train"].is_failed()
    # Downstream of a failure: never started, reported as NotReady, not as a failure of its own.
    assert states["report"] is not None and states["report"].name == "NotReady"
    assert states["report"].is_pending()
    assert os.environ.get("LMFORGE_PARENT_RUN_ID") is None  # the flow did not leak it into this process


def test_gpu_stage_sent_to_deployment_comes_back_through_run_cache(
    tmp_path: Path,
    prefect_server: None,
    mlflow_store: str,
    reference_lock: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The routed path without a worker process: the deployment call runs the worker flow
    in-process on a second clone; the two clones share only git and a DVC remote."""
    repo = make_repo(tmp_path / "orchestrator", remote=tmp_path / "dvc-remote")
    worker = tmp_path / "worker-clone"
    _sh(["git", "clone", "-q", str(repo), str(worker)], tmp_path)
    sent: list[dict[str, object]] = []

    def fake_run_deployment(name: str, parameters: dict[str, object], **_: object) -> SimpleNamespace:
        assert name == GPU_DEPLOYMENT
        sent.append(parameters)
        state = run_stage(**parameters, workdir=str(worker), return_state=True)
        return SimpleNamespace(state=state, name="fake-gpu-run", id="fake-id")

    monkeypatch.setattr(flow_mod, "run_deployment", fake_run_deployment)
    monkeypatch.setattr(flow_mod, "gpu_deployment_exists", lambda name=GPU_DEPLOYMENT: True)

    state = pipeline(root=str(repo), return_state=True)
    assert state.is_completed(), state.message
    summary = state.result()
    assert summary["train"]["where"] == "deployment"
    assert summary["train"]["outcome"] == "restored"  # checked out from the run-cache, not re-run
    assert calls(repo) == ["prep prefect:local", "report prefect:local"]
    assert calls(worker) == ["train prefect:worker"]
    head = _sh(["git", "rev-parse", "HEAD"], repo).strip()
    parent = parent_run("prefect.flow_run_id", str(state.state_details.flow_run_id))
    assert [(p["stage"], p["rev"], p["parent_run_id"]) for p in sent] == [("train", head, parent.info.run_id)]
    assert (repo / "dvc.lock").read_text() == reference_lock
    assert (repo / "report.txt").read_text() == "preptrainreport"

    # Up to date here: the gpu stage is not sent again.
    again = pipeline(root=str(repo))
    assert len(sent) == 1
    assert {s: i["outcome"] for s, i in again.items()} == dict.fromkeys(STAGES, "up-to-date")


def test_failed_deployment_run_fails_the_stage(
    tmp_path: Path, prefect_server: None, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = make_repo(tmp_path / "orchestrator", remote=tmp_path / "dvc-remote")
    monkeypatch.setattr(
        flow_mod,
        "run_deployment",
        lambda name, parameters, **_: SimpleNamespace(
            state=Failed(message="CUDA out of memory"), name="oom-run", id="fake-id"
        ),
    )
    monkeypatch.setattr(flow_mod, "gpu_deployment_exists", lambda name=GPU_DEPLOYMENT: True)
    state = pipeline(root=str(repo), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert f"gpu stage 'train' failed on deployment '{GPU_DEPLOYMENT}'" in message
    assert "'oom-run'" in message and "CUDA out of memory" in message
    assert "not run because an upstream stage failed: report" in message
    assert calls(repo) == ["prep prefect:local"]
