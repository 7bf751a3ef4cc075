"""The local stack (`make stack-up` / `make stack-down`): real servers and workers on 127.0.0.1,
and the DAG up to `govern` sent through `prefect deployment run` (two cpu stages to the cpu
worker, two gpu stages to the gpu worker's clone, whose stage records the workspace's audit chain
names by hash). The rest of the DAG adds no new route: the whole DAG goes through the Prefect
flow in tests/test_pipeline_e2e.py.
Half way through pretraining the gpu worker is killed with everything under it (a GPU host
lost) and started again: the heartbeat automation marks the lost run Crashed, the pipeline
sends the stage again, and the new run resumes from the checkpoint the dead one left."""

from __future__ import annotations

import json
import socket
import subprocess
import time
from pathlib import Path

import pytest

from pipelines.stack import PIDS, Stack, down, family, kill_worker, session_members, start_worker, up
from tests.pipeline_repo import commit, copy_repo, env_for, lock_outs, run

pytestmark = pytest.mark.slow
TARGET = "govern"  # the deployment runs this stage and its upstream
BIN = Path(__file__).resolve().parent.parent / ".venv" / "bin"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def records(log: Path) -> list[dict]:
    return [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []


def checkpoint_step(clone: Path, stage: str) -> int:
    steps = [json.loads(p.read_text())["step"] for p in clone.glob(f".lmforge/scratch/{stage}/*/ckpt/latest.json")]
    return max(steps, default=0)


def stage_runs(api_url: str, stage: str) -> list[str]:
    """States of the lmforge-stage flow runs sent for `stage`, oldest first."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: api_url}), get_client(sync_client=True) as client:
        runs = client.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["lmforge-stage"])),
                                     sort=FlowRunSort.START_TIME_ASC)
    return [r.state.name for r in runs if r.parameters.get("stage") == stage and r.state is not None]


def test_deployment_run_survives_a_lost_gpu_worker_and_matches_dvc_repro(tmp_path: Path, ci_dag: Path) -> None:
    from stages import dag

    repo = copy_repo(tmp_path / "repo")  # the ci profile committed: the gpu worker checks the commit out
    # A 60 s silence marks the killed run Crashed instead of 90 s: two missed heartbeats (one every
    # 30 s, Prefect's minimum) rather than three; the test's wait is the only thing that changes.
    automations = repo / "pipelines/automations.yaml"
    text = automations.read_text()
    assert text.count("within: 90") == 1
    automations.write_text(text.replace("within: 90", "within: 60"))
    commit(repo, "test: a 60 s heartbeat window")  # the flow sends only committed code to workers
    stack = Stack(repo, free_port(), free_port())
    up(stack)
    sessions: set[int] = set()
    try:
        env = stack.env(PYTHONPATH=env_for(repo)["PYTHONPATH"])
        pipeline = subprocess.Popen([str(BIN / "prefect"), "deployment", "run", "lmforge-pipeline/default",
                                     "--param", f"stages={json.dumps([TARGET])}", "--watch",
                                     "--watch-timeout", "1500"], cwd=repo, env=env, stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
        # pretrain checkpoints every 20 of its 60 steps (ci profile): kill once the first is written
        deadline = time.monotonic() + 900
        while checkpoint_step(stack.gpu_clone, "pretrain") < 20 and pipeline.poll() is None:
            assert time.monotonic() < deadline, "pretrain never wrote a checkpoint on the gpu worker"
            time.sleep(0.2)
        assert pipeline.poll() is None, pipeline.communicate()[0][-4000:]
        killed = kill_worker(stack, "gpu")
        assert len(killed) >= 4  # the worker, its flow run, `dvc repro`, the stage
        start_worker(stack, "gpu")
        out, _ = pipeline.communicate(timeout=1600)
        assert pipeline.returncode == 0, out[-4000:]

        assert stage_runs(stack.api_url, "pretrain") == ["Crashed", "Completed"]
        worker_log = (stack.dir / "logs/worker-gpu.log").read_text(errors="replace")
        assert "resuming from checkpoint" in worker_log and "(step 20 of 60)" in worker_log
        specs = {n: s for n, s in dag.load_stages(repo).items() if n in ("mix", "tokenizer", "pretrain", TARGET)}
        gpu = {n for n, s in specs.items() if s.runner == "gpu"}
        assert gpu == {"pretrain", "govern"} and set(specs) - gpu == {"mix", "tokenizer"}
        ran_here = {r["stage"]: r["runner"] for r in records(repo / "audit/log.jsonl") if r["kind"] == "stage"}
        ran_there = {r["stage"]: r["runner"] for r in records(stack.gpu_clone / "audit/log.jsonl")
                     if r["kind"] == "stage"}
        assert set(ran_here) == set(specs) - gpu and set(ran_there) == gpu, (ran_here, ran_there)
        assert set(ran_here.values()) == {"prefect:cpu"} and set(ran_there.values()) == {"prefect:gpu"}
        # the chains meet: for each gpu stage the workspace's chain holds a stage.remote record
        # naming the worker's own stage record by hash, with the same output digests
        remote = {r["stage"]: r for r in records(repo / "audit/log.jsonl") if r["kind"] == "stage.remote"}
        there = {r["hash"]: r for r in records(stack.gpu_clone / "audit/log.jsonl")}
        assert set(remote) == gpu
        for stage, r in remote.items():
            theirs = there[r["worker_record"]["record_hash"]]
            assert theirs["kind"] == "stage" and theirs["stage"] == stage and theirs["outputs"] == r["outputs"]
            assert r["runner"] == "prefect:gpu" and r["mlflow_run_id"] == theirs["mlflow_run_id"]
        assert "up to date" in run(repo, "dvc", "status", TARGET).stdout
        # the same artifacts as `dvc repro` of the same commit (dvc.lock's other entries are the
        # committed ones, from the default profile: not compared)
        ran = lock_outs(repo, specs)
        assert len(ran) == sum(len(s.all_outs) for s in specs.values()) and ran == lock_outs(ci_dag, specs)
        for p in json.loads((stack.dir / PIDS).read_text()):
            sessions |= family(int(p["pid"]))[0]
    finally:
        down(stack)
    assert sessions and not any(session_members(sid) for sid in sessions)  # nothing left behind
    assert not (stack.dir / PIDS).exists()
