"""Helpers for end-to-end tests: a throwaway copy of this repo and commands run inside it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Collection
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def copy_repo(dest: Path, profile: str | None = "ci") -> Path:
    """Copy the working tree (tracked + untracked-not-ignored files) into a fresh git repo."""
    files = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"],
        cwd=ROOT, capture_output=True, check=True,
    ).stdout.decode().split("\0")
    for rel in filter(None, files):
        src = ROOT / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    subprocess.run(["git", "init", "-q"], cwd=dest, check=True)
    commit(dest, "copy")
    if not (dest / ".dvc" / "config").exists():
        run(dest, "dvc", "init", "-q")
    if profile:
        run(dest, "lmforge", "profile", "apply", profile)
        # committed, so that a worker checking out the commit runs with these params too
        commit(dest, f"profile {profile}")
    return dest


def commit(repo: Path, message: str) -> None:
    """Commit everything with a fixed author and date: two copies of one working tree are one
    commit (same hash, same time), as two clones of a commit are, so what records the commit
    (the audit, a forge manifest's `created`) is comparable across copies."""
    env = env_for(repo) | {"GIT_AUTHOR_DATE": "2026-01-01T00:00:00+00:00",
                           "GIT_COMMITTER_DATE": "2026-01-01T00:00:00+00:00"}
    for cmd in (["git", "add", "-A"], ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", message]):
        subprocess.run(cmd, cwd=repo, check=True, env=env)


def env_for(repo: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["PYTHONPATH"] = f"{repo / 'lib'}{os.pathsep}{repo}"  # the copy runs its own code
    env.pop("MLFLOW_TRACKING_URI", None)
    env.pop("LMFORGE_PARENT_RUN_ID", None)
    env.pop("PREFECT_API_URL", None)
    return env


def run(repo: Path, *cmd: str, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess[str]:
    exe = str(BIN / cmd[0]) if (BIN / cmd[0]).exists() else cmd[0]
    proc = subprocess.run([exe, *cmd[1:]], cwd=repo, env=env_for(repo), capture_output=True, text=True,
                          timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


# Outputs that differ between clean runs on purpose, and the keys that make them differ: the
# govern stage's metrics.json carries both runs' wall-clocks (issue 4 asks for them there).
TIMED = {"data/govern/metrics.json": ("wall_clock_governed_s", "wall_clock_ungoverned_s")}
# ... and the export's model card, whose audit section names the audit head of its own run.
CARD = "data/export/README.md"
AUDIT_SECTION = "\n## Audit\n"
# ... and the report, whose last section ("This run": times, run ids, the audit head) is per run.
REPORTS = ("data/report/report.md", "data/report/report.html")


def _per_run_stripped(repo: Path, path: str) -> str | None:
    """Output `path` without what differs between clean runs on purpose (its timings, the audit
    head it cites); None for an output that runs must reproduce byte for byte."""
    import json

    if path in TIMED:
        keys = TIMED[path]
        metrics = json.loads((repo / path).read_text())
        assert all(k in metrics for k in keys), (path, keys)
        return json.dumps({k: v for k, v in metrics.items() if k not in keys}, sort_keys=True)
    if path == CARD:  # the model card cites the audit head, which differs per run: compare the rest
        text = (repo / path).read_text()
        assert AUDIT_SECTION in text, path
        head, _, tail = text.partition(AUDIT_SECTION)
        return head + tail.split("\n## ", 1)[-1]
    if path in REPORTS:  # the report's last section ("This run") is per run: compare the rest
        from lmforge.report.document import stable_part

        return stable_part((repo / path).read_text())
    return None


def lock_outs(repo: Path, stages: Collection[str] | None = None) -> dict[str, str]:
    """Every output path in dvc.lock (of `stages`, default all) with its md5: the artifact
    digests two runs must share. An output that differs per run on purpose (TIMED, the model
    card, the report) is represented by its content without those parts instead."""
    import yaml

    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    outs = {o["path"]: o["md5"] for name, st in lock["stages"].items() if stages is None or name in stages
            for o in st.get("outs", [])}
    for path in outs:
        stripped = _per_run_stripped(repo, path)
        if stripped is not None:
            outs[path] = stripped
    return outs


def output_digest(repo: Path, path: str) -> str | None:
    """What two complete runs share of output `path`: its sha256 (a directory's by lmforge.digest),
    or that of its content without the per-run parts (as lock_outs); None if it is absent."""
    import hashlib

    from lmforge.digest import sha256_path

    if not (repo / path).exists():
        return None
    stripped = _per_run_stripped(repo, path)
    return sha256_path(repo / path) if stripped is None else hashlib.sha256(stripped.encode()).hexdigest()
