"""SIGKILL a stage at random moments: no torn output is ever visible, and a re-run completes
with the same artifacts and an intact audit chain."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from lmforge.audit import AuditLog
from lmforge.digest import sha256_path
from stages import dag
from tests.pipeline_repo import BIN, env_for, lock_outs, run

pytestmark = pytest.mark.slow
TRIALS = 8


def test_killed_stage_never_leaves_a_torn_output(tmp_path: Path, ci_dag: Path) -> None:
    repo = tmp_path / "repo"
    shutil.copytree(ci_dag, repo, symlinks=True)  # a whole ci-profile DAG already run (its own copy)
    assert "up to date" in run(repo, "dvc", "status").stdout
    lock = lock_outs(repo)
    outs = [o for s in dag.load_stages(repo).values() for o in s.outs + s.metrics]
    complete = {o: sha256_path(repo / o) for o in outs}
    # kill points are spread over each stage's own duration, whatever the machine's speed
    duration = {}
    for stage in ("mix", "tokenizer"):
        t0 = time.perf_counter()
        run(repo, "python", "-m", f"stages.{stage}")
        duration[stage] = time.perf_counter() - t0
    rng = random.Random(7)
    killed = 0
    for trial in range(TRIALS):
        stage = ("mix", "tokenizer")[trial % 2]
        proc = subprocess.Popen([str(BIN / "python"), "-m", f"stages.{stage}"], cwd=repo, env=env_for(repo),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.05, 0.98) * duration[stage])
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            killed += 1
        proc.wait()
        for out in outs:
            # the previous complete output (same inputs: the same bytes), or none — never a torn one
            if (repo / out).exists():
                assert sha256_path(repo / out) == complete[out], (trial, stage, out)
        for spec in dag.load_stages(repo).values():
            # a stage's outputs are swapped in as one set: all there or none
            present = {(repo / o).exists() for o in spec.outs + spec.metrics}
            assert len(present) == 1, (trial, spec.name, present)
        report = AuditLog(repo / "audit/log.jsonl").verify()
        assert report.ok or report.recoverable, (trial, report.problem)
    print(f"{killed}/{TRIALS} trials killed a running stage")
    assert killed >= TRIALS // 2, "too few trials interrupted a running stage"
    run(repo, "dvc", "repro")
    assert lock_outs(repo) == lock
    assert {o: sha256_path(repo / o) for o in outs} == complete
    assert "up to date" in run(repo, "dvc", "status").stdout
    run(repo, "lmforge", "audit", "verify")
