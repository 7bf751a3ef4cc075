"""Run a command (normally `dvc ...`) with its output streamed live to a logger.

Shared by the pipeline flow (`pipelines/flow.py`) and the worker flow
(`pipelines/stage_runner.py`), so both stream, time and fail stages the same way. Not run
on its own; `run_logged([...], cwd, env, logging.getLogger())` works outside Prefect too.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

from lmforge.errors import LmforgeError
from lmforge.tracking import PARENT_ENV

RUNNER_ENV = "LMFORGE_RUNNER"  # read by stages/wrapper.py into the audit record
TAIL_LINES = 40
# After an interrupt, how long the command's process group gets to exit on SIGTERM (DVC
# removes its lock, a stage closes its MLflow run) before the rest is SIGKILLed. Shorter than
# the 30 s a Prefect worker gives a cancelled flow-run process before SIGKILLing it
# (prefect/runner/_process_manager.py): that SIGKILL cannot reach this separate group, so our
# own escalation must come first.
TERMINATE_GRACE_S = 20.0
KILL_WAIT_S = 5.0  # then, how long SIGKILL gets to take effect (it cannot be refused)
# MLflow's own variables that would make a stage's `mlflow.start_run(parent_run_id=...)`
# resume an outer run (MLFLOW_RUN_ID) or file it under another experiment than its parent
# (the EXPERIMENT pair) if the flow's environment happened to carry them.
INHERITED_MLFLOW_RUN_ENV = ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME")
# Tracking URI schemes whose store lives on this machine: a worker elsewhere cannot reach the
# parent run in it. No scheme at all (a bare path) is a file store too.
LOCAL_TRACKING_SCHEMES = ("", "file", "sqlite")
# A progress bar redraws with '\r' many times a second; forwarding every redraw would bury
# the Prefect log, so carriage-return lines are forwarded at most this often.
PROGRESS_EVERY_S = 5.0

Logger = logging.Logger | logging.LoggerAdapter  # what prefect.get_run_logger() returns


class StageFailedError(LmforgeError):
    """A `dvc` command for a stage exited non-zero; the message carries its stderr tail."""


@dataclass(frozen=True)
class CommandResult:
    argv: tuple[str, ...]
    returncode: int
    seconds: float
    stdout_tail: tuple[str, ...]
    stderr_tail: tuple[str, ...]
    dvc_lines: tuple[str, ...]  # DVC's per-stage verdicts, kept whatever the output's length

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    @property
    def shown(self) -> str:
        """The command as a user would type it (`dvc ...`, not `python -m dvc ...`)."""
        argv = self.argv
        if len(argv) >= 3 and argv[1:3] == ("-m", "dvc"):
            argv = ("dvc", *argv[3:])
        return " ".join(argv)


def dvc_argv(*args: str) -> list[str]:
    """`dvc` from this interpreter's environment, whatever is first on PATH."""
    return [sys.executable, "-m", "dvc", *args]


def runner_label(outside_a_pool: str) -> str:
    """Who runs a stage, for its audit record: `prefect:<work pool>` when this flow run was
    picked up by a worker of that pool (`prefect:cpu`, `prefect:gpu`), otherwise
    `prefect:<outside_a_pool>` (the flow called in-process, e.g. `make flow`)."""
    from prefect.context import FlowRunContext

    ctx = FlowRunContext.get()
    pool = ctx.flow_run.work_pool_name if ctx and ctx.flow_run else None
    return f"prefect:{pool or outside_a_pool}"


def stage_env(
    runner: str, parent_run_id: str | None, base: Mapping[str, str] | None = None
) -> dict[str, str]:
    """Environment for a stage subprocess: who runs it and which MLflow run is its parent.

    MLflow's run/experiment variables (INHERITED_MLFLOW_RUN_ENV) are removed, so the stage's
    `start_run(parent_run_id=...)` creates a child of `parent_run_id`, not a resumption of
    whatever run an outer process had active.

    The interpreter's bin directory goes first on PATH because dvc.yaml commands say
    `python -m stages.<name>`, which must resolve to the project's venv even when the venv
    was never activated (`make flow` calls `.venv/bin/python` directly).
    """
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")]) if env.get("PATH") else bindir
    env.setdefault("DVC_NO_ANALYTICS", "1")
    env[RUNNER_ENV] = runner
    for name in INHERITED_MLFLOW_RUN_ENV:
        env.pop(name, None)
    if parent_run_id:
        env[PARENT_ENV] = parent_run_id
    else:
        # An inherited id would attach the stage to some other pipeline run.
        env.pop(PARENT_ENV, None)
    return env


def tracking_store_is_shared(uri: str | None) -> bool:
    """Whether an MLflow tracking URI names a store that another machine can reach.

    False for no URI (lmforge then uses `sqlite:///<root>/mlflow.db`), `sqlite:`, `file:` and
    bare paths; True for a tracking server (`http(s)://`, `databricks`, ...) or a database URI.
    """
    if not uri:
        return False
    if uri in ("databricks", "databricks-uc", "uc"):  # MLflow's profile-less Databricks URIs
        return True
    scheme = urlsplit(uri).scheme.lower()
    if len(scheme) == 1:  # a Windows drive letter (C:\runs): a local path
        return False
    return scheme not in LOCAL_TRACKING_SCHEMES


# How `dvc repro` reports what it did with a stage (see `outcome`).
_VERDICTS = ("Running stage '", "Stage '", "Pulling data for ")


def _pump(stream: IO[bytes], log: Logger, level: int, tail: deque[str], verdicts: list[str]) -> None:
    # newline="" keeps '\r' as a line end of its own, so progress redraws are recognisable.
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
    last_progress = 0.0
    for raw in text:
        line = raw.rstrip("\r\n")
        if not line:
            continue
        tail.append(line)
        if line.startswith(_VERDICTS):
            verdicts.append(line)
        if raw.endswith("\r") and not raw.endswith("\r\n"):
            now = time.monotonic()
            if now - last_progress < PROGRESS_EVERY_S:
                continue
            last_progress = now
        log.log(level, "%s", line)


def run_logged(
    argv: Sequence[str],
    cwd: str | Path,
    env: Mapping[str, str],
    log: Logger,
    tail_lines: int = TAIL_LINES,
    grace_s: float = TERMINATE_GRACE_S,
) -> CommandResult:
    """Run `argv` in `cwd`, forwarding stdout and stderr line by line to `log` as they come.

    Never raises on a non-zero exit (see `require_ok`); keeps the last lines of each stream.
    If this process is interrupted meanwhile (Ctrl-C, a Prefect cancel), the command and
    everything it started are stopped (`stop_group`) before the interrupt propagates.
    """
    start = time.monotonic()
    log.info("$ %s  (in %s)", " ".join(argv), cwd)
    proc = subprocess.Popen(
        list(argv),
        cwd=cwd,
        env=dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
        # Its own session, hence its own process group (pgid == proc.pid): `dvc repro` runs
        # the stage as a child of its own, and an interrupt must reach that child too, not
        # only dvc (a stage left running would write outputs after DVC's lock is gone).
        start_new_session=True,
    )
    assert proc.stdout is not None and proc.stderr is not None
    out_tail: deque[str] = deque(maxlen=tail_lines)
    err_tail: deque[str] = deque(maxlen=tail_lines)
    verdicts: list[str] = []
    try:
        # Two readers, so a chatty stderr cannot fill its pipe and stall the child while we
        # block on stdout.
        readers = [
            threading.Thread(
                target=_pump, args=(proc.stdout, log, logging.INFO, out_tail, verdicts), daemon=True
            ),
            threading.Thread(
                target=_pump, args=(proc.stderr, log, logging.INFO, err_tail, verdicts), daemon=True
            ),
        ]
        for r in readers:
            r.start()
        returncode = proc.wait()
    except BaseException:
        # Interrupted (KeyboardInterrupt, Prefect's TerminationSignal on cancel, ...): do not
        # leave dvc holding its lock, nor its stage running on without it.
        log.warning("interrupted: stopping `%s` and every process it started", " ".join(argv))
        stop_group(proc, grace_s)
        raise
    for r in readers:
        r.join()
    return CommandResult(
        argv=tuple(argv),
        returncode=returncode,
        seconds=time.monotonic() - start,
        stdout_tail=tuple(out_tail),
        stderr_tail=tuple(err_tail),
        dvc_lines=tuple(verdicts),
    )


def _group_alive(pgid: int) -> bool:
    """Whether any process of group `pgid` is still running (zombies do not count)."""
    proc_root = Path("/proc")
    if (proc_root / "self" / "stat").exists():
        # Linux: read each process's state and group. kill(0) alone would also count zombies,
        # and a stage orphaned by dvc stays one for good where PID 1 does not reap (containers).
        for stat in proc_root.glob("[0-9]*/stat"):
            try:
                text = stat.read_text()
            except OSError:  # it ended while we looked
                continue
            # After the ')' closing the command name (which may itself hold spaces): state, ppid, pgrp.
            fields = text[text.rindex(")") + 2 :].split()
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
        return False
    try:
        os.killpg(pgid, 0)  # signal 0 only asks whether a process of the group exists
    except ProcessLookupError:
        return False
    return True


def stop_group(proc: subprocess.Popen[bytes], grace_s: float = TERMINATE_GRACE_S) -> None:
    """SIGTERM the process group of `proc` (started with `start_new_session=True`), SIGKILL
    whatever of it still runs after `grace_s` seconds, and reap `proc`.

    The wait is for the whole group, not only `proc`: dvc may exit on SIGTERM while the stage
    it started is still shutting down (or ignores SIGTERM).
    """
    pgid = proc.pid
    with contextlib.suppress(ProcessLookupError):  # the group has already ended
        os.killpg(pgid, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline:
        proc.poll()  # reap `proc` as soon as it exits
        if proc.returncode is not None and not _group_alive(pgid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    proc.wait()
    # SIGKILL is delivered asynchronously: wait until the group is really gone, so that once
    # the interrupt propagates, nothing of it can still write.
    deadline = time.monotonic() + KILL_WAIT_S
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(0.02)


def dvc_json(args: Sequence[str], cwd: str | Path, env: Mapping[str, str]) -> Any:
    """A `dvc ... --json` query's answer (not streamed: it is data, not progress)."""
    argv = dvc_argv(*args)
    done = subprocess.run(argv, cwd=cwd, env=dict(env), capture_output=True, text=True, check=False)
    result = CommandResult(
        argv=tuple(argv),
        returncode=done.returncode,
        seconds=0.0,
        stdout_tail=tuple(done.stdout.splitlines()[-TAIL_LINES:]),
        stderr_tail=tuple(done.stderr.splitlines()[-TAIL_LINES:]),
        dvc_lines=(),
    )
    require_ok(result, f"asking DVC in {cwd}")
    return json.loads(done.stdout)


def require_ok(result: CommandResult, what: str, fix: str = "") -> CommandResult:
    """Raise StageFailedError naming `what`, the exit code and the stderr tail if it failed."""
    if result.ok:
        return result
    msg = f"{what} failed: `{result.shown}` exited {result.returncode}"
    if fix:
        msg += f"; fix: {fix}"
    if result.stderr_tail:
        msg += "\n--- last lines of stderr ---\n" + "\n".join(result.stderr_tail)
    elif result.stdout_tail:
        msg += "\n--- last lines of stdout (stderr was empty) ---\n" + "\n".join(result.stdout_tail)
    raise StageFailedError(msg)


def outcome(stage: str, result: CommandResult) -> str:
    """What `dvc repro --single-item <stage>` did, read from DVC's report of it.

    'ran' (the stage's command ran), 'restored' (outputs checked out from the run-cache or
    pulled from the remote), or 'up-to-date' (nothing changed, nothing done).
    """
    verdict = "up-to-date"
    for line in result.dvc_lines:
        if line.startswith(f"Running stage '{stage}'"):
            verdict = "ran"
        elif line.startswith((f"Stage '{stage}' is cached", "Pulling data for ")):
            verdict = "restored"
    return verdict
