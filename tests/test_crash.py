"""Crash anywhere: SIGKILL every stage of dvc.yaml at random moments, on its own and inside
`dvc repro`, and check that no torn output is ever visible, the audit chain survives, and the
DAG comes back to the same artifacts.

The stages are read from dvc.yaml, so a new stage is covered without touching this file. Each
trial starts a copy of the session's ci-profile DAG (`ci_dag`) either as `python -m
stages.<name>` or as `dvc repro --force --single-item <name>` (DVC's lock, run-cache and
.dvc/tmp are then part of what is killed), in its own session, and SIGKILLs the whole process
group (stages may start children, e.g. torchrun) at a seeded random moment. Kill points come
from each stage's own duration in the reference run's audit log (`started`/`finished` of its
record, plus the gap before it: start-up, imports, DVC's bookkeeping), so they follow the
machine's speed without re-running anything to time it. After every kill:

(a) every declared output is either its previous complete bytes or absent (outputs that differ
    per run on purpose are compared without their timings / audit head, as tests/pipeline_repo.py
    does), a stage's outputs are all present or all absent, and nothing undeclared sits in
    data/<stage>/; dvc.lock still parses and records the same artifacts (after a kill inside
    `dvc repro`, the two files DVC itself rewrites in place, dvc.lock and .dvc/tmp/rwlock, are
    first mended the way docs/operations.md says if the kill tore them, and the trial says so);
(b) the audit chain verifies, or is an interrupted append that the next append commits, and
    every record it held before the campaign is still there unchanged.

After the campaign (c): `dvc repro` completes, `dvc status` is up to date, dvc.lock's artifact
digests and every output's digest equal the pre-campaign ones, and `lmforge audit verify` passes.

Two sizes:
- CI (LMFORGE_CRASH_TRIALS unset): LEAN_TRIALS (20) trials: one per stage, killed within the
  first LEAN_WINDOW_S seconds of its run (the long stages early in theirs), two inside `dvc repro`
  on the two quickest stages, and the rest a second kill of the quickest stages. A killed stage
  that left a checkpoint is run again to completion (it must resume, to the same bytes); one
  whose outputs the kill changed is put back with `dvc repro --single-item` (DVC's run-cache).
  2-4 minutes on 2 cores on top of the ci DAG.
- `make crash` (LMFORGE_CRASH_TRIALS=N, at least one per stage): N trials, every stage at least
  once, about a third inside `dvc repro`, kill points uniform over the stage's whole run; every
  killed stage is then run again to completion (a training stage resumes from the checkpoint the
  killed run left) and must give the same bytes, and every killed `dvc repro` is followed by
  `dvc repro --single-item` (DVC after the kill: lock, run-cache). LMFORGE_CRASH_SEED picks the seed.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import IO

import pytest
import yaml

from lmforge.audit import AuditLog
from lmforge.train.checkpoint import LATEST
from pipelines.dvc_state import heal_torn_rwlock
from pipelines.proc import _group_alive
from stages import dag
from stages.wrapper import SCRATCH_DIR
from tests.pipeline_repo import BIN, CARD, REPORTS, TIMED, env_for, lock_outs, output_digest, run

pytestmark = pytest.mark.slow
TRIALS_ENV = "LMFORGE_CRASH_TRIALS"
SEED_ENV = "LMFORGE_CRASH_SEED"
LEAN_WINDOW_S = 15.0  # CI: kill within this many seconds of the earliest start of a stage's own run
LEAN_DVC_TRIALS = 2
LEAN_TRIALS = 20  # CI's campaign: the issue asks for at least 20 trials across the DAG in the slow suite
DVC_SHARE = 3  # the full campaign runs every DVC_SHARE-th trial inside `dvc repro`
PER_RUN = set(TIMED) | {CARD, *REPORTS}  # outputs whose raw bytes differ between complete runs on purpose
RESUMED = "lmforge: resuming from checkpoint"  # what lmforge.train.loop prints when it resumes


@dataclass(frozen=True)
class Timing:
    """A stage's time in the reference run: `before` from the previous stage's end to this
    one's `started` (DVC's bookkeeping, interpreter start-up, imports), `own` its record's
    `started` to `finished`."""

    before: float
    own: float


@dataclass(frozen=True)
class Trial:
    stage: str
    in_dvc: bool  # killed inside `dvc repro --force --single-item`, else `python -m stages.<stage>`
    at: float  # seconds after the start at which the process group is killed
    lo: float  # the span `at` was drawn from (seconds after the start)
    hi: float


@dataclass(frozen=True)
class Outcome:
    trial: Trial
    killed: bool  # the kill found the process running
    resumed: bool  # the re-run after the kill resumed from a checkpoint


def _timings(repo: Path, stages: list[str]) -> dict[str, Timing]:
    """Each stage's timing from its first record in the reference run's audit log."""
    starts: dict[str, tuple[datetime, datetime]] = {}
    for rec in AuditLog(repo / dag.pipeline_config(repo).audit_log).records():
        if rec["kind"] == "stage" and rec["stage"] not in starts:
            starts[rec["stage"]] = (datetime.fromisoformat(rec["started"]), datetime.fromisoformat(rec["finished"]))
    missing = [s for s in stages if s not in starts]
    assert not missing, f"the reference run's audit log has no record of stages {missing}"
    order = sorted(stages, key=lambda s: starts[s][0])
    gaps = {s: (starts[s][0] - starts[p][1]).total_seconds() for p, s in zip(order, order[1:], strict=False)}
    first = min(gaps.values()) if gaps else 5.0  # no record before the first stage: its quickest peer's
    return {s: Timing(before=max(gaps.get(s, first), 0.5), own=(starts[s][1] - starts[s][0]).total_seconds())
            for s in stages}


def _plan(stages: list[str], timing: dict[str, Timing], trials: int | None, rng: random.Random) -> list[Trial]:
    """The campaign: which stage, how it is started, and when it is killed.

    A stage process's own run starts somewhere between the quickest start-up the reference run
    saw and the gap before this stage there (which also holds DVC's bookkeeping), so its kill
    points span both: from the one to the stage's latest end. Inside `dvc repro`, they span DVC's
    own start-up and its bookkeeping after the command too. Each kill point is uniform over its
    span, stratified across the trials (one in each n-th of the span, in shuffled order), so even
    a short campaign kills some stages early and some late (publishing, after a checkpoint)."""
    quickest = min(t.before for t in timing.values())
    if trials is None:  # CI: lean
        quick = sorted(stages, key=lambda s: 2 * timing[s].before + timing[s].own)
        picks = [(s, False) for s in stages] + [(s, True) for s in quick[:LEAN_DVC_TRIALS]]
        picks += [(quick[i % len(quick)], False) for i in range(max(LEAN_TRIALS - len(picks), 0))]
        cap = LEAN_WINDOW_S
    else:
        if trials < len(stages):
            pytest.fail(f"{TRIALS_ENV}={trials}: the campaign needs at least one trial per stage ({len(stages)})")
        chosen = stages + [rng.choice(stages) for _ in range(trials - len(stages))]
        rng.shuffle(chosen)
        picks, cap = [(s, i % DVC_SHARE == DVC_SHARE - 1) for i, s in enumerate(chosen)], None
    strata = list(range(len(picks)))
    rng.shuffle(strata)
    plan = []
    for (stage, in_dvc), k in zip(picks, strata, strict=True):
        t = timing[stage]
        lo, hi = (0.0, 2 * t.before + t.own) if in_dvc else (quickest, t.before + t.own)
        fraction = (k + rng.random()) / len(picks)
        plan.append(Trial(stage, in_dvc, lo + fraction * min(hi - lo, cap or hi), lo, hi))
    return plan


def _start(repo: Path, trial: Trial, log: IO[bytes]) -> subprocess.Popen[bytes]:
    cmd = (["dvc", "repro", "--force", "--single-item", trial.stage] if trial.in_dvc
           else ["python", "-m", f"stages.{trial.stage}"])
    # its own session, hence its own process group: the kill reaches dvc's stage and torchrun's workers too
    return subprocess.Popen([str(BIN / cmd[0]), *cmd[1:]], cwd=repo, env=env_for(repo), stdout=log,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)


def _kill_at(proc: subprocess.Popen[bytes], at: float, t0: float) -> bool:
    """SIGKILL `proc`'s process group `at` seconds after `t0`, unless it ended first; wait until
    nothing of the group runs any more. Returns whether the kill found it running."""
    while time.monotonic() < t0 + at and proc.poll() is None:
        time.sleep(0.01)
    with contextlib.suppress(ProcessLookupError):  # the whole group had already ended
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 30
    while _group_alive(proc.pid):  # SIGKILL is delivered asynchronously, children may still write
        assert time.monotonic() < deadline, f"process group {proc.pid} still runs 30 s after SIGKILL"
        time.sleep(0.02)
    return proc.returncode == -signal.SIGKILL


def _digest(repo: Path, out: str) -> str | None:
    try:
        return output_digest(repo, out)
    except (ValueError, AssertionError) as e:  # a per-run output that does not even parse: torn
        return f"unreadable: {e}"


def _differ(repo: Path, outs: tuple[str, ...], complete: dict[str, str | None]) -> list[str]:
    """The outputs in `outs` that are absent or not their complete bytes."""
    return [o for o in outs if _digest(repo, o) != complete[o]]


def _raw(repo: Path, outs: list[str]) -> dict[str, str | None]:
    from lmforge.digest import sha256_path

    return {o: sha256_path(repo / o) if (repo / o).exists() else None for o in outs}


def _lock_md5(repo: Path, where: str) -> dict[str, str]:
    try:
        lock = yaml.safe_load((repo / "dvc.lock").read_text())
        return {o["path"]: o["md5"] for st in lock["stages"].values() for o in st.get("outs", [])}
    except (yaml.YAMLError, KeyError, TypeError, AttributeError) as e:
        raise AssertionError(f"{where}: dvc.lock is torn (DVC rewrites it in place, not atomically): {e}") from None


def _mend_dvc(repo: Path, paths: set[str]) -> list[str]:
    """After a kill inside `dvc repro`: mend the two files DVC itself rewrites in place, torn if
    the kill fell in those milliseconds (a DVC limitation, not an lmforge output), the way
    docs/operations.md says; return which. A dvc.lock is torn when it does not parse or lacks
    some of the output `paths` it recorded (cut short). lmforge's own outputs are checked after."""
    mended = []
    if heal_torn_rwlock(repo, logging.getLogger(__name__)):  # what the flows do
        mended.append(".dvc/tmp/rwlock")
    try:
        whole = set(_lock_md5(repo, "")) == paths
    except AssertionError:
        whole = False
    if not whole:  # `rm dvc.lock && dvc repro`: every stage restored from the run-cache
        (repo / "dvc.lock").unlink()
        ran = run(repo, "dvc", "repro").stdout
        assert "Running stage" not in ran, f"a stage ran again instead of coming back from the run-cache:\n{ran}"
        mended.append("dvc.lock")
    return mended


def _chain_hashes(log: Path) -> list[str]:
    """The hashes of the log's complete lines (a torn last line left out: `verify` judges it)."""
    lines = log.read_bytes().split(b"\n")[:-1]
    return [json.loads(line)["hash"] for line in lines]


def _check_state(repo: Path, specs: dict[str, dag.StageSpec], complete: dict[str, str | None],
                 lock_md5: dict[str, str], chain: list[str], where: str) -> None:
    """(a) and (b): what DVC, a user or the next stage would find right after a kill."""
    for spec in specs.values():
        found = {o: _digest(repo, o) for o in spec.all_outs}
        for out, digest in found.items():
            # the previous complete output (same inputs: the same bytes), or none, never a torn one
            assert digest is None or digest == complete[out], f"{where}: {out} is torn or half-written"
        present = {o for o, d in found.items() if d is not None}
        # a stage's outputs are swapped in as one set: all there or none
        assert not present or present == set(found), f"{where}: {spec.name} shows only {sorted(present)}"
        out_dir = repo / spec.out_dir
        if out_dir.is_dir():
            declared = {Path(o).relative_to(spec.out_dir).parts[0] for o in spec.all_outs} | {".gitignore"}
            stray = sorted(p.name for p in out_dir.iterdir() if p.name not in declared)
            assert not stray, f"{where}: {spec.out_dir}/ holds undeclared {stray} (a staging leftover?)"
    now = _lock_md5(repo, where)
    assert {p: m for p, m in now.items() if p not in PER_RUN} == {p: m for p, m in lock_md5.items() if p not in PER_RUN}, \
        f"{where}: dvc.lock records other artifacts"
    log = AuditLog(repo / dag.pipeline_config(repo).audit_log)
    report = log.verify()
    assert report.ok or report.recoverable, f"{where}: audit chain broken: {report.problem}"
    assert _chain_hashes(log.path)[: len(chain)] == chain, f"{where}: audit records from before the campaign changed"


def _log_tail(path: Path) -> str:
    return path.read_text(errors="replace")[-3000:]


def test_killed_stages_never_leave_a_torn_output(tmp_path: Path, ci_dag: Path) -> None:
    t_start = time.monotonic()
    repo = tmp_path / "repo"
    shutil.copytree(ci_dag, repo, symlinks=True)  # a whole ci-profile DAG already run (its own copy)
    assert "up to date" in run(repo, "dvc", "status").stdout
    specs = dag.load_stages(repo)
    stages = list(specs)
    outs = [o for s in specs.values() for o in s.all_outs]
    lock = lock_outs(repo)
    lock_md5 = _lock_md5(repo, "before the campaign")
    complete = {o: output_digest(repo, o) for o in outs}
    raw = _raw(repo, outs)
    log_path = repo / dag.pipeline_config(repo).audit_log
    chain = _chain_hashes(log_path)
    trials_env = os.environ.get(TRIALS_ENV, "").strip()
    trials = int(trials_env) if trials_env else None
    rng = random.Random(int(os.environ.get(SEED_ENV, "7")))
    plan = _plan(stages, _timings(repo, stages), trials, rng)
    assert {t.stage for t in plan} == set(stages)

    outcomes: list[Outcome] = []
    for i, trial in enumerate(plan):
        how = "dvc repro" if trial.in_dvc else "stage"
        where = f"trial {i} ({trial.stage} via {how}, kill at {trial.at:.1f} s)"
        log_file = tmp_path / f"trial-{i:02d}-{trial.stage}{'-dvc' if trial.in_dvc else ''}.log"
        with open(log_file, "wb") as log:
            t0 = time.monotonic()
            proc = _start(repo, trial, log)
            killed = _kill_at(proc, trial.at, t0)
        # a run the kill missed must have completed; one that failed on its own is a bug (e.g. no resume)
        assert killed or proc.returncode == 0, f"{where}: exited {proc.returncode}:\n{_log_tail(log_file)}"
        mended = _mend_dvc(repo, set(lock_md5)) if trial.in_dvc else []
        _check_state(repo, specs, complete, lock_md5, chain, where)
        stage_outs = specs[trial.stage].all_outs
        resumed = False
        scratch = repo / SCRATCH_DIR / trial.stage  # a killed run's checkpoints
        checkpointed = killed and any(scratch.rglob(LATEST))
        if killed and not trial.in_dvc and (trials is not None or checkpointed):
            # run it again to completion: a training stage resumes from the checkpoint the kill left
            proc_rerun = run(repo, "python", "-m", f"stages.{trial.stage}")
            resumed = RESUMED in proc_rerun.stderr
            assert not (other := _differ(repo, stage_outs, complete)), f"{where}: the re-run gave other {other}"
            assert checkpointed <= resumed, f"{where}: the re-run did not resume from the killed run's checkpoint"
            assert not scratch.exists(), f"{where}: resumable state left after a successful run"
            report = AuditLog(log_path).verify()
            assert report.ok, f"{where}: audit chain after the re-run: {report.problem}"
        elif trial.in_dvc or any(_raw(repo, list(stage_outs))[o] != raw[o] for o in stage_outs):
            # DVC after a kill inside it (its lock, run-cache, .dvc/tmp): puts the outputs back
            run(repo, "dvc", "repro", "--single-item", trial.stage)
            assert not (other := _differ(repo, stage_outs, complete)), f"{where}: DVC did not restore {other}"
        _check_state(repo, specs, complete, lock_md5, chain, f"{where}, after putting it back")
        outcomes.append(Outcome(trial, killed, resumed))
        print(f"{where}, drawn from {trial.lo:.1f}-{trial.hi:.1f} s: {'killed' if killed else 'it had finished'}"
              + (", re-run resumed from a checkpoint" if resumed else "")
              + (f"; DVC's own {' and '.join(mended)} torn by the kill, mended as docs/operations.md says"
                 if mended else ""))

    # (c) the DAG comes back: the same artifacts, DVC up to date, the audit chain intact
    run(repo, "dvc", "repro")
    assert "up to date" in run(repo, "dvc", "status").stdout
    assert lock_outs(repo) == lock
    assert {o: output_digest(repo, o) for o in outs} == complete
    if AuditLog(log_path).verify().recoverable:  # the last kill interrupted an append no later run finished
        run(repo, "lmforge", "audit", "recover", "--log", str(log_path))
    run(repo, "lmforge", "audit", "verify", "--log", str(log_path))

    n, killed_n = len(outcomes), sum(o.killed for o in outcomes)
    in_dvc = sum(o.killed and o.trial.in_dvc for o in outcomes)
    resumed_n = sum(o.resumed for o in outcomes)
    print(f"crash campaign: {n}/{n} trials passed, {killed_n} killed a running stage ({in_dvc} inside dvc repro), "
          f"{resumed_n} re-runs resumed from a checkpoint; {len(stages)} stages; "
          f"{time.monotonic() - t_start:.0f} s")
    assert killed_n > n / 2, f"only {killed_n} of {n} trials interrupted a running stage"
    assert in_dvc >= 1, "no trial interrupted `dvc repro`"
