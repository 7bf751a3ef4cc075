"""pipelines/dvc_state.py: a torn `.dvc/tmp/rwlock` (a `dvc` killed while rewriting it) is moved
aside so dvc runs again, and only when no dvc command is running in the repo. The flows call it
(tests/test_flow.py covers the worker's crash-resubmission path)."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.dvc_state import heal_torn_rwlock
from pipelines.proc import stage_env

LOG = logging.getLogger("test")


def _dvc(repo: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=repo, env=stage_env("test", None),
                          capture_output=True, text=True, timeout=120)


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    subprocess.run(["git", "init", "-q", str(tmp_path)], check=True)
    assert _dvc(tmp_path, "init", "-q").returncode == 0
    (tmp_path / ".dvc/tmp").mkdir(exist_ok=True)
    (tmp_path / "dvc.yaml").write_text("stages:\n  s:\n    cmd: echo x > out.txt\n    outs: [out.txt]\n")
    return tmp_path


def test_a_torn_rwlock_is_moved_aside_and_dvc_runs_again(repo: Path, caplog: pytest.LogCaptureFixture) -> None:
    rwlock = repo / ".dvc/tmp/rwlock"
    rwlock.write_bytes(b'{"read": {}, "wri')  # cut mid-write
    refused = _dvc(repo, "repro")
    assert refused.returncode != 0 and "JSON structure is corrupted" in refused.stderr
    with caplog.at_level(logging.WARNING):
        assert heal_torn_rwlock(repo, LOG)
    assert not rwlock.exists() and (repo / ".dvc/tmp/rwlock.torn").read_bytes() == b'{"read": {}, "wri'
    assert "a dvc command was killed while rewriting it" in caplog.text and str(rwlock) in caplog.text
    assert _dvc(repo, "repro").returncode == 0 and (repo / "out.txt").exists()
    assert not heal_torn_rwlock(repo, LOG)  # nothing left to do


def test_a_whole_rwlock_or_none_is_left_alone(repo: Path) -> None:
    assert not heal_torn_rwlock(repo, LOG)
    rwlock = repo / ".dvc/tmp/rwlock"
    rwlock.write_text('{"read": {}, "write": {"out.txt": {"pid": 1, "cmd": "dvc repro"}}}')
    assert not heal_torn_rwlock(repo, LOG)
    assert rwlock.exists() and not (repo / ".dvc/tmp/rwlock.torn").exists()


def test_a_running_dvc_command_keeps_its_rwlock(repo: Path) -> None:
    """While another process holds DVC's repo lock the file may be mid-write: not touched."""
    rwlock = repo / ".dvc/tmp/rwlock"
    rwlock.write_bytes(b"")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom dvc.repo import Repo\nr = Repo(sys.argv[1])\n"
         "r.lock.lock()\nprint('held', flush=True)\ntime.sleep(120)", str(repo)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        assert not heal_torn_rwlock(repo, LOG)  # after DVC's 3 s of retries
        assert rwlock.exists()
    finally:
        holder.kill()
        holder.wait()
    assert heal_torn_rwlock(repo, LOG) and not rwlock.exists()
