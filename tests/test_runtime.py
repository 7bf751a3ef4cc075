"""Code version: a run's own writes (dvc.lock, DVC's .gitignore files) do not make it dirty."""

from __future__ import annotations

import subprocess
from pathlib import Path

from lmforge.runtime import code_version, environment


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=repo, check=True,
                   capture_output=True)


def test_dirty_flag_ignores_what_the_run_writes(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q")
    (tmp_path / "code.py").write_text("x = 1\n")
    (tmp_path / "dvc.lock").write_text("a\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "c")
    clean = code_version(tmp_path)
    assert clean["dirty"] is False and len(clean["commit"]) == 40
    (tmp_path / "dvc.lock").write_text("b\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / ".gitignore").write_text("/out\n")
    assert code_version(tmp_path)["dirty"] is False
    (tmp_path / "code.py").write_text("x = 2\n")
    dirty = code_version(tmp_path)
    assert dirty["dirty"] is True and dirty["changed_files"] == 1
    (tmp_path / "code.py").write_text("x = 3\n")
    assert code_version(tmp_path)["changes_sha256"] != dirty["changes_sha256"]


def test_outside_git_and_environment(tmp_path: Path) -> None:
    assert code_version(tmp_path) == {"commit": None, "dirty": None}
    env = environment()
    assert env["device"] == "cpu" or env["device"].startswith("cuda")
    assert env["packages"]["numpy"] and env["python"]
