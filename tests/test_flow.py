"""The Prefect flow drives dvc.yaml like `dvc repro` does: same order, same dvc.lock, same skips.

Run: `.venv/bin/python -m pytest -q tests/test_flow.py` (about 80 s on 2 cores: one Prefect
test server, ~10 s, plus DVC's ~1 s start-up per command). Everything happens in tmp dirs:
toy git+DVC repos of three stages (the middle one `meta.runner: gpu`), a Prefect test server
with its own database and PREFECT_HOME, one MLflow SQLite store. The gpu route is tested
without a worker process: the deployment call is replaced by the worker flow run in-process
on a second clone that shares only git and a DVC remote with the first.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import mlflow
import pytest
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType, TaskRun
from prefect.settings import (
    PREFECT_HOME,
    PREFECT_SERVER_ANALYTICS_ENABLED,
    temporary_settings,
)
from prefect.states import Failed, Running, Scheduled
from prefect.testing.utilities import prefect_test_harness

from lmforge.audit import AuditLog
from lmforge.digest import sha256_path
from lmforge.errors import ConfigError
from pipelines import flow as flow_mod
from pipelines.flow import GPU_DEPLOYMENT, choose_route, pipeline
from pipelines.graph import plan
from pipelines.proc import (
    StageFailedError,
    outcome,
    require_ok,
    run_logged,
    stage_env,
    tracking_store_is_shared,
)
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
# What the routed tests tell the flow MLFLOW_TRACKING_URI is: a server a worker could reach.
# The store really used stays the module's SQLite one, which the in-process "worker" shares.
SHARED_TRACKING_URI = "http://mlflow.test:5000"


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
    ("runner", "api_url", "exists", "rev", "uri", "where", "reason_has"),
    [
        ("cpu", "http://x/api", True, "abc", "http://m", "local", "cpu stage"),
        ("gpu", None, True, "abc", "http://m", "local", "PREFECT_API_URL"),
        ("gpu", "http://x/api", False, "abc", "http://m", "local", f"no deployment '{GPU_DEPLOYMENT}'"),
        ("gpu", "http://x/api", True, None, "http://m", "local", "no git commit"),
        # The worker's stage run must join the parent run: not through a store on this machine.
        ("gpu", "http://x/api", True, "abc", None, "local", "MLFLOW_TRACKING_URI is unset"),
        ("gpu", "http://x/api", True, "abc", "sqlite:////w/mlflow.db", "local", "'sqlite:////w/mlflow.db'"),
        ("gpu", "http://x/api", True, "abc", "file:///w/mlruns", "local", "shared MLflow server"),
        ("gpu", "http://x/api", True, "abc", "http://m", "deployment", GPU_DEPLOYMENT),
        ("gpu", "http://x/api", True, "abc", "databricks", "deployment", GPU_DEPLOYMENT),
    ],
)
def test_choose_route(
    runner: str,
    api_url: str | None,
    exists: bool,
    rev: str | None,
    uri: str | None,
    where: str,
    reason_has: str,
) -> None:
    route = choose_route(runner, api_url, exists, rev, uri)
    assert route.where == where
    assert reason_has in route.reason
    assert route.deployment == (GPU_DEPLOYMENT if where == "deployment" else None)


@pytest.mark.parametrize(
    ("uri", "shared"),
    [
        (None, False),
        ("", False),
        ("sqlite:///mlflow.db", False),
        ("SQLITE:////abs/mlflow.db", False),
        ("file:///srv/mlruns", False),
        ("/srv/mlruns", False),
        ("mlruns", False),
        ("C:\\runs", False),
        ("http://10.0.0.5:5000", True),
        ("https://mlflow.example.org", True),
        ("databricks", True),
        ("databricks://profile", True),
        ("postgresql://mlflow@db/mlflow", True),  # a database other machines can reach
    ],
)
def test_tracking_store_is_shared(uri: str | None, shared: bool) -> None:
    assert tracking_store_is_shared(uri) is shared


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


def _running(pid: int) -> bool:
    """Whether `pid` is a live process; a zombie (dead, not yet reaped by its new parent, e.g.
    a PID 1 that never reaps) does not count."""
    stat = Path(f"/proc/{pid}/stat")
    if Path("/proc/self/stat").exists():
        try:
            text = stat.read_text()
        except OSError:
            return False
        return text[text.rindex(")") + 2 :].split()[0] != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_interrupted_run_logged_stops_the_commands_children_too(tmp_path: Path) -> None:
    """Ctrl-C during `dvc repro`: the stage dvc started must die with it, not write its outputs
    later. Here a toy parent (dvc) starts a grandchild (the stage) that ignores SIGTERM, sleeps,
    then writes a file; SIGINT reaches this process while run_logged waits."""
    late = tmp_path / "written-after-interrupt"
    pid_file = tmp_path / "grandchild.pid"
    grandchild = (
        "import os, signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        "open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(2); open(sys.argv[2], 'w').write('late')"
    )
    parent = (
        "import subprocess, sys; "
        f"subprocess.run([sys.executable, '-c', {grandchild!r}, sys.argv[1], sys.argv[2]])"
    )

    def interrupt_once_started() -> None:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            if pid_file.exists() and pid_file.read_text():
                # A real SIGINT, as Ctrl-C delivers it: it also wakes the main thread from
                # waitpid() (which _thread.interrupt_main() would not).
                os.kill(os.getpid(), signal.SIGINT)
                return
            time.sleep(0.02)
        # Never started: no signal, so pytest.raises below fails instead of pytest itself.

    # A shell that starts jobs in the background (`cmd &`) hands them SIGINT ignored, and Python
    # then installs no KeyboardInterrupt handler: install it here so the test does not depend on
    # how the suite was launched.
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    timer = threading.Thread(target=interrupt_once_started, daemon=True)
    timer.start()
    started = time.monotonic()
    try:
        with pytest.raises(KeyboardInterrupt):
            run_logged(
                [sys.executable, "-c", parent, str(pid_file), str(late)],
                tmp_path,
                _env(),
                logging.getLogger("test_flow.interrupt"),
                grace_s=0.5,
            )
    finally:
        signal.signal(signal.SIGINT, previous)
    timer.join()
    pid = int(pid_file.read_text())
    assert not _running(pid), "the grandchild outlived the interrupt"
    # Past the moment it would have written (2 s after it started): nothing was written.
    time.sleep(max(0.0, started + 3.0 - time.monotonic()))
    assert not late.exists()


def test_stage_env_starts_a_child_run_not_an_inherited_one() -> None:
    outer = {
        "PATH": "/usr/bin",
        "MLFLOW_RUN_ID": "outer-run",
        "MLFLOW_EXPERIMENT_ID": "7",
        "MLFLOW_EXPERIMENT_NAME": "elsewhere",
        "LMFORGE_PARENT_RUN_ID": "stale-parent",
        "MLFLOW_TRACKING_URI": "http://mlflow.test:5000",  # where to log: kept
    }
    env = stage_env("prefect:local", "parent-123", outer)
    assert not {"MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"} & env.keys()
    assert env["LMFORGE_PARENT_RUN_ID"] == "parent-123"
    assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.test:5000"
    assert env["LMFORGE_RUNNER"] == "prefect:local"
    assert env["PATH"].split(os.pathsep) == [str(Path(sys.executable).parent), "/usr/bin"]
    assert "LMFORGE_PARENT_RUN_ID" not in stage_env("prefect:local", None, outer)
    assert outer["MLFLOW_RUN_ID"] == "outer-run"  # the caller's mapping is left alone


def test_uncommitted_lists_renames_and_odd_names_by_path(tmp_path: Path) -> None:
    repo = tmp_path / "git"
    repo.mkdir()
    _sh(["git", "init", "-q"], repo)
    names = ["old name.txt", "plain.txt", "é.txt", "dvc.lock", "untouched.txt"]
    for name in names:
        (repo / name).write_text("v1\n")
    _sh(["git", "add", "-A"], repo)
    _sh(["git", "-c", "user.email=t@t.invalid", "-c", "user.name=t", "commit", "-q", "-m", "one"], repo)
    _sh(["git", "mv", "old name.txt", "new -> name.txt"], repo)  # `R  old -> new` in plain porcelain
    for name in ("plain.txt", "é.txt", "dvc.lock"):
        (repo / name).write_text("v2\n")
    (repo / "untracked.txt").write_text("new\n")
    assert sorted(flow_mod._uncommitted(repo)) == sorted(
        ["new -> name.txt", "old name.txt", "plain.txt", "é.txt"]
    )


def test_unfinished_deployment_run_messages() -> None:
    not_picked = flow_mod._unfinished_message("train", GPU_DEPLOYMENT, "calm-cat", "id-1", Scheduled(), 60.0)
    assert f"no worker of deployment '{GPU_DEPLOYMENT}' picked up flow run 'calm-cat' (id-1)" in not_picked
    assert "within 60 s (gpu_timeout_s)" in not_picked and "prefect worker start --pool gpu" in not_picked
    slow = flow_mod._unfinished_message("train", GPU_DEPLOYMENT, "calm-cat", "id-1", Running(), 60.0)
    assert f"flow run 'calm-cat' (id-1) on deployment '{GPU_DEPLOYMENT}' did not finish within 60 s" in slow
    assert "(it is Running)" in slow
    queued = flow_mod._unfinished_message(
        "train", GPU_DEPLOYMENT, "calm-cat", "id-1", Scheduled(name="AwaitingConcurrencySlot"), None
    )
    assert f"still waiting after the time allowed for the one slot of deployment '{GPU_DEPLOYMENT}'" in queued


def test_gpu_timeout_option() -> None:
    assert flow_mod._timeout_arg("90") == 90.0
    assert flow_mod._timeout_arg("None") is None
    for bad in ("0", "-5", "soon"):
        with pytest.raises(Exception, match=repr(bad)):
            flow_mod._timeout_arg(bad)


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

    def fake_run_deployment(
        name: str, parameters: dict[str, object], timeout: float | None = None, **_: object
    ) -> SimpleNamespace:
        assert name == GPU_DEPLOYMENT
        assert timeout == flow_mod.DEFAULT_GPU_TIMEOUT_S
        sent.append(parameters)
        state = run_stage(**parameters, workdir=str(worker), return_state=True)
        return SimpleNamespace(state=state, name="fake-gpu-run", id="fake-id", work_pool_name="gpu")

    monkeypatch.setattr(flow_mod, "run_deployment", fake_run_deployment)
    monkeypatch.setattr(flow_mod, "gpu_deployment_exists", lambda name=GPU_DEPLOYMENT: True)
    monkeypatch.setattr(flow_mod, "configured_tracking_uri", lambda: SHARED_TRACKING_URI)

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
    # this workspace's audit chain records the stage the worker ran, with what came back
    (remote,) = [r for r in AuditLog(repo / "audit/log.jsonl").records() if r["kind"] == "stage.remote"]
    assert remote["stage"] == "train" and remote["runner"] == "prefect:gpu" and remote["flow_run_id"] == "fake-id"
    assert remote["outputs"] == {f: sha256_path(repo / f) for f in ("train.txt", "train.json")}
    assert remote["worker_record"] is None  # the toy stage has no stage wrapper: no worker chain to name
    assert AuditLog(repo / "audit/log.jsonl").verify().ok

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
    monkeypatch.setattr(flow_mod, "configured_tracking_uri", lambda: SHARED_TRACKING_URI)
    state = pipeline(root=str(repo), return_state=True)
    assert state.is_failed()
    message = str(state.result(raise_on_failure=False))
    assert f"gpu stage 'train' failed on deployment '{GPU_DEPLOYMENT}'" in message
    assert "'oom-run'" in message and "CUDA out of memory" in message
    assert "resubmission" not in message  # a stage's own failure is not sent again
    assert "not run because an upstream stage failed: report" in message
    assert calls(repo) == ["prep prefect:local"]


def test_crashed_gpu_run_is_resubmitted_but_a_failed_one_is_not(
    tmp_path: Path, prefect_server: None, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A run that ended Crashed (its worker died) is sent again, up to gpu_crash_retries times;
    the first resubmission here succeeds, although the dead run's `dvc repro` tore DVC's rwlock
    in the worker clone. With every run crashing, the stage fails saying so."""
    from prefect.states import Crashed

    repo = make_repo(tmp_path / "orchestrator", remote=tmp_path / "dvc-remote")
    worker = tmp_path / "worker-clone"
    _sh(["git", "clone", "-q", str(repo), str(worker)], tmp_path)
    sent: list[str] = []

    def crash_once(name: str, parameters: dict[str, object], **_: object) -> SimpleNamespace:
        sent.append(str(parameters["stage"]))
        if len(sent) == 1:  # killed while rewriting .dvc/tmp/rwlock: dvc refuses to run until healed
            (worker / ".dvc/tmp").mkdir(parents=True, exist_ok=True)
            (worker / ".dvc/tmp/rwlock").write_bytes(b"")
            return SimpleNamespace(state=Crashed(message="no heartbeat for 90 s"), name="lost-run", id="id-1")
        return SimpleNamespace(state=run_stage(**parameters, workdir=str(worker), return_state=True),
                               name="second-run", id="id-2", work_pool_name="gpu")

    monkeypatch.setattr(flow_mod, "run_deployment", crash_once)
    monkeypatch.setattr(flow_mod, "gpu_deployment_exists", lambda name=GPU_DEPLOYMENT: True)
    monkeypatch.setattr(flow_mod, "configured_tracking_uri", lambda: SHARED_TRACKING_URI)
    summary = pipeline(root=str(repo))
    assert sent == ["train", "train"] and summary["train"]["attempts"] == 2
    assert summary["train"]["outcome"] == "restored" and summary["train"]["flow_run_id"] == "id-2"
    assert (worker / ".dvc/tmp/rwlock.torn").read_bytes() == b""  # moved aside, kept

    always: list[str] = []
    monkeypatch.setattr(flow_mod, "run_deployment", lambda name, parameters, **_: always.append("x") or SimpleNamespace(
        state=Crashed(message="no heartbeat for 90 s"), name="lost-run", id="id-3"))
    state = pipeline(root=str(repo), force=True, stages=["train"], gpu_crash_retries=1, return_state=True)
    assert state.is_failed() and len(always) == 2
    message = str(state.result(raise_on_failure=False))
    assert "ended Crashed: no heartbeat for 90 s (after 1 resubmission(s))" in message


def test_gpu_stage_not_picked_up_in_time_fails_and_is_cancelled(
    tmp_path: Path, prefect_server: None, mlflow_store: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run_deployment gives up after gpu_timeout_s and returns the run still Scheduled (no gpu
    worker online): the stage fails naming the deployment and run, and the run is cancelled so
    that no worker starts it later. The run here is a real one on the test server."""
    from prefect import flow

    @flow(name="lmforge-stage-stand-in")
    def stand_in() -> None:  # never run: only its flow run record is needed
        return None

    with get_client(sync_client=True) as client:
        queued = client.create_flow_run(stand_in, state=Scheduled())
    repo = make_repo(tmp_path / "orchestrator", remote=tmp_path / "dvc-remote")
    waited: list[float | None] = []

    def no_worker(
        name: str, parameters: dict[str, object], timeout: float | None = None, **_: object
    ) -> object:
        waited.append(timeout)
        with get_client(sync_client=True) as client:
            return client.read_flow_run(queued.id)

    monkeypatch.setattr(flow_mod, "run_deployment", no_worker)
    monkeypatch.setattr(flow_mod, "gpu_deployment_exists", lambda name=GPU_DEPLOYMENT: True)
    monkeypatch.setattr(flow_mod, "configured_tracking_uri", lambda: SHARED_TRACKING_URI)

    state = pipeline(root=str(repo), gpu_timeout_s=42, return_state=True)
    assert state.is_failed()
    assert waited == [42]
    message = str(state.result(raise_on_failure=False))
    assert (
        f"gpu stage 'train': no worker of deployment '{GPU_DEPLOYMENT}' picked up "
        f"flow run '{queued.name}' ({queued.id}) within 42 s (gpu_timeout_s)"
    ) in message
    assert "it was cancelled" in message
    assert "not run because an upstream stage failed: report" in message
    with get_client(sync_client=True) as client:
        after = client.read_flow_run(queued.id).state
    assert after is not None and after.type == StateType.CANCELLED
    assert calls(repo) == ["prep prefect:local"]


def test_force_reruns_only_the_named_stages_not_their_upstream(
    tmp_path: Path, prefect_server: None, mlflow_store: str
) -> None:
    repo = make_repo(tmp_path / "force")
    _dvc("repro", cwd=repo)  # everything up to date (runner 'test' in calls.log)
    assert calls(repo) == [f"{s} test" for s in STAGES]

    summary = pipeline(stages=["train"], force=True, root=str(repo))
    # train's upstream is planned and checked, but not forced: DVC finds it up to date.
    assert {s: i["outcome"] for s, i in summary.items()} == {"prep": "up-to-date", "train": "ran"}
    assert calls(repo)[3:] == ["train prefect:local"]
    assert json.loads(_dvc("status", "--json", cwd=repo)) == {}
