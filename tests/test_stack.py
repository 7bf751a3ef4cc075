"""The local stack (`make stack-up` / `make stack-down`): real servers and workers on 127.0.0.1,
and the whole DAG sent through `prefect deployment run`, gpu stages to the gpu worker's clone."""

from __future__ import annotations

import json
import socket
import subprocess
from pathlib import Path

import pytest

from pipelines.stack import PIDS, Stack, down, session_members, up
from tests.pipeline_repo import copy_repo, env_for, lock_outs, run

pytestmark = pytest.mark.slow
BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def records(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def test_deployment_run_sends_gpu_stages_to_the_gpu_worker_and_matches_dvc_repro(tmp_path: Path,
                                                                                   ci_dag: Path) -> None:
    from stages import dag

    repo = copy_repo(tmp_path / "repo")  # the ci profile committed: the gpu worker checks the commit out
    stack = Stack(repo, free_port(), free_port())
    up(stack)
    sessions = [int(p["pid"]) for p in json.loads((stack.dir / PIDS).read_text())]
    try:
        env = stack.env(PYTHONPATH=env_for(repo)["PYTHONPATH"])
        done = subprocess.run([str(BIN / "prefect"), "deployment", "run", "lmforge-pipeline/default", "--watch",
                               "--watch-timeout", "1500"], cwd=repo, env=env, capture_output=True, text=True,
                              timeout=1600)
        assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
        specs = dag.load_stages(repo)
        gpu = {n for n, s in specs.items() if s.runner == "gpu"}
        ran_here = {r["stage"]: r["runner"] for r in records(repo / "audit/log.jsonl") if r["kind"] == "stage"}
        ran_there = {r["stage"]: r["runner"] for r in records(stack.gpu_clone / "audit/log.jsonl")
                     if r["kind"] == "stage"}
        assert set(ran_here) == set(specs) - gpu and set(ran_there) == gpu, (ran_here, ran_there)
        assert set(ran_here.values()) == {"prefect:local"} and set(ran_there.values()) == {"prefect:gpu"}
        assert "up to date" in run(repo, "dvc", "status").stdout
        assert lock_outs(repo) == lock_outs(ci_dag)  # the same artifacts as `dvc repro` of the same commit
    finally:
        down(stack)
    assert not any(session_members(sid) for sid in sessions)  # nothing left behind
    assert not (stack.dir / PIDS).exists()
