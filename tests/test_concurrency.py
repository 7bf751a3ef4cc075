"""Two runs at once: in one workspace (DVC's lock turns the second away at once) and from two
workspaces into one audit log (the chain serialises them). Both start from copies of the
session's ci-profile DAG (`ci_dag`)."""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from lmforge.audit import AuditLog
from stages import dag
from tests.pipeline_repo import BIN, env_for, lock_outs, output_digest, run

pytestmark = pytest.mark.slow
# DVC's two refusals: a stage's outputs held by the other run (its rwlock, .dvc/tmp/rwlock), or
# the repo lock (.dvc/tmp/lock) not free after DVC's 3 s of retries (dvc/lock.py, dvc/rwlock.py).
BUSY = "is busy, it is being blocked by"
LOCKED = "Unable to acquire lock. Most likely another DVC process is running"


def _copy(ci_dag: Path, dest: Path) -> Path:
    shutil.copytree(ci_dag, dest, symlinks=True)
    assert "up to date" in run(dest, "dvc", "status").stdout
    return dest


def _start(repo: Path, *cmd: str, log: Path) -> subprocess.Popen[bytes]:
    with open(log, "wb") as fh:
        return subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], cwd=repo, env=env_for(repo), stdout=fh,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _holds_outputs(repo: Path, pid: int) -> bool:
    """Whether DVC's rwlock shows process `pid` writing a stage's outputs."""
    try:
        lock = json.loads((repo / ".dvc/tmp/rwlock").read_text())
    except (FileNotFoundError, json.JSONDecodeError):  # not there yet, or being rewritten (in place)
        return False
    return any(info.get("pid") == pid for info in lock.get("write", {}).values())


def _outputs(repo: Path) -> dict[str, str | None]:
    return {o: output_digest(repo, o) for s in dag.load_stages(repo).values() for o in s.all_outs}


def test_second_dvc_repro_in_one_workspace_fails_fast(tmp_path: Path, ci_dag: Path) -> None:
    repo = _copy(ci_dag, tmp_path / "repo")
    lock, outputs = lock_outs(repo), _outputs(repo)
    # pretrain: long enough on the ci profile (~20 s with start-up) for the second to come and go
    first = _start(repo, "dvc", "repro", "--force", "--single-item", "pretrain", log=tmp_path / "first.log")
    try:
        deadline = time.monotonic() + 120
        while not _holds_outputs(repo, first.pid):
            assert first.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first dvc repro never locked the stage's outputs"
            time.sleep(0.05)
        t0 = time.monotonic()
        second = run(repo, "dvc", "repro", check=False)
        waited = time.monotonic() - t0
        # it gave up while the first still ran: it did not wait for it
        assert first.poll() is None, f"the first run ended before the second returned ({waited:.1f} s)"
        assert second.returncode != 0, second.stdout
        said = second.stdout + second.stderr
        assert (BUSY in said and f"(PID {first.pid}): " in said) or LOCKED in said, said
        error = next(line for line in said.splitlines() if BUSY in line or LOCKED in line)
        print(f"the second dvc repro failed after {waited:.1f} s: {error.strip()}")
        assert first.wait(timeout=600) == 0, (tmp_path / "first.log").read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    # nothing was corrupted: the same artifacts, DVC up to date, the chain intact
    assert "up to date" in run(repo, "dvc", "status").stdout
    assert lock_outs(repo) == lock
    assert _outputs(repo) == outputs
    run(repo, "lmforge", "audit", "verify")


def test_two_pipelines_append_to_one_audit_log(tmp_path: Path, ci_dag: Path) -> None:
    shared = tmp_path / "shared" / "log.jsonl"  # pipeline.audit_log may be absolute: root / path is it
    repos = [_copy(ci_dag, tmp_path / f"repo{i}") for i in range(2)]
    own_logs = []
    for repo in repos:
        params = repo / "params.yaml"
        default = f"audit_log: {dag.PipelineConfig().audit_log}"
        assert default in params.read_text()
        params.write_text(params.read_text().replace(default, f"audit_log: {shared}", 1))
        assert Path(repo / dag.pipeline_config(repo).audit_log) == shared
        own_logs.append((repo / "audit/log.jsonl").read_bytes())
    procs = [_start(r, "dvc", "repro", "--force", "--single-item", "mix", log=tmp_path / f"mix{i}.log")
             for i, r in enumerate(repos)]
    for i, p in enumerate(procs):
        assert p.wait(timeout=600) == 0, (tmp_path / f"mix{i}.log").read_text()[-3000:]
    verified = run(repos[0], "lmforge", "audit", "verify", "--log", str(shared)).stdout
    assert "audit chain OK: 3 records" in verified, verified
    records = list(AuditLog(shared).records())
    assert [r["kind"] for r in records] == ["genesis", "stage", "stage"]
    assert {r["stage"] for r in records[1:]} == {"mix"}
    assert len({r["mlflow_run_id"] for r in records[1:]}) == 2  # one record from each workspace
    outs = {o: output_digest(repos[0], o) for o in dag.load_stage(repos[0], "mix").all_outs}
    assert all(r["outputs"] == outs for r in records[1:])
    for repo, own in zip(repos, own_logs, strict=True):
        assert (repo / "audit/log.jsonl").read_bytes() == own  # each workspace's own chain untouched
        assert "up to date" in run(repo, "dvc", "status").stdout
