"""A local deployment stack on 127.0.0.1, for trying `prefect deployment run` and for tests.

    make stack-up        # or: .venv/bin/python -m pipelines.stack up [--prefect-port N --mlflow-port N]
    source .stack/env    # PREFECT_API_URL, MLFLOW_TRACKING_URI, PREFECT_HOME for this shell
    .venv/bin/prefect deployment run lmforge-pipeline/default --watch
    make stack-down      # stops every process it started, by PID, and waits until they are gone
    .venv/bin/python -m pipelines.stack kill-worker gpu    # a GPU host dies mid-stage...
    .venv/bin/python -m pipelines.stack start-worker gpu   # ...and comes back: the stage resumes

What `up` starts, in `.stack/` (ignored by git):
- a Prefect server (`prefect server start`, its database in `.stack/prefect/`);
- the work pools `cpu` and `gpu` (process type) and prefect.yaml's deployments (`prefect deploy --all`);
- an MLflow server (`mlflow server --workers 1`, SQLite and artifacts in `.stack/mlflow/`), which
  both workers and this workspace track to;
- a local-directory DVC remote, `.stack/dvc-remote`, set as the default remote in this workspace's
  and the gpu clone's `.dvc/config.local` (never in the committed config);
- one process worker per pool: the `cpu` worker runs flow runs in this workspace, the `gpu` worker
  in `.stack/gpu-clone`, a git clone of it with the same DVC remote: the simulated GPU host, which
  imports its own checkout's code (PYTHONPATH), never this workspace's;
- the automation of pipelines/automations.yaml, which marks a gpu stage's flow run Crashed when
  its heartbeats stop (its worker died): the pipeline flow then resubmits the stage.

Every process is started in a session of its own and recorded in `.stack/pids.json` as soon as it
runs, so `down` finds it even after an `up` that failed half way; `down` stops the workers first
(with any flow run they started, found by parentage: Prefect starts each in a session of its
own), then the servers, SIGTERM then SIGKILL.
Offline settings for every tool are set here (analytics and telemetry off, Prefect's start-up
timeout raised) and written to `.stack/env`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from lmforge.errors import LmforgeError

STACK_DIR = ".stack"
PIDS = "pids.json"
OFFLINE = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",  # else it spawns job-queue processes that outlive it
    "DVC_NO_ANALYTICS": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
DEPLOYMENTS = ("lmforge-pipeline/default", "lmforge-stage/gpu")
POOLS = ("cpu", "gpu")
# Marks a gpu stage's flow run Crashed when its heartbeats stop (prefect.yaml sets their rate).
AUTOMATIONS = "pipelines/automations.yaml"


class StackError(LmforgeError):
    """The stack could not start (the message names the part and its log) or stop."""


@dataclass(frozen=True)
class Stack:
    root: Path
    prefect_port: int = 4200
    mlflow_port: int = 5000

    @property
    def dir(self) -> Path:
        return self.root / STACK_DIR

    @property
    def gpu_clone(self) -> Path:
        return self.dir / "gpu-clone"

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.prefect_port}/api"

    @property
    def tracking_uri(self) -> str:
        return f"http://127.0.0.1:{self.mlflow_port}"

    def env(self, **extra: str) -> dict[str, str]:
        """The environment every stack process (and a user's shell, via .stack/env) runs with."""
        env = dict(os.environ) | OFFLINE
        bindir = str(Path(sys.executable).parent)
        env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "")])
        env.update(PREFECT_API_URL=self.api_url, PREFECT_HOME=str(self.dir / "prefect"),
                   MLFLOW_TRACKING_URI=self.tracking_uri, HF_HOME=str(self.dir / "hf"))
        env.pop("LMFORGE_PARENT_RUN_ID", None)
        return env | extra


# --- processes ------------------------------------------------------------------------------------

def _read_pids(stack: Stack) -> list[dict[str, object]]:
    path = stack.dir / PIDS
    return json.loads(path.read_text()) if path.exists() else []


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state != "Z"


def _procs() -> dict[int, tuple[int, int]]:
    """pid -> (parent pid, session id) of every live process (Linux /proc)."""
    out = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
        except (FileNotFoundError, ProcessLookupError):
            continue
        if fields[0] != "Z":
            out[int(p.name)] = (int(fields[1]), int(fields[3]))
    return out


def session_members(sid: int) -> list[int]:
    """Every live process of session `sid`: a service and whatever it started in its session."""
    return [pid for pid, (_, s) in _procs().items() if s == sid]


def family(sid: int, known: set[int] | None = None) -> tuple[set[int], list[int]]:
    """The sessions of process `sid` and of all its descendants, and their live members.

    A Prefect process worker starts each flow run in a session of its own (so that a signal to
    the worker's group does not reach it), so a worker's flow runs, and the `dvc repro` and
    stage processes under them, are outside its session: found here by parentage. `known`
    sessions stay in the family after their parent is gone (a killed worker's orphans)."""
    procs = _procs()
    sessions = set(known or ()) | {sid}
    grew = True
    while grew:
        members = {pid for pid, (_, s) in procs.items() if s in sessions}
        kids = {s for pid, (ppid, s) in procs.items() if ppid in members}
        grew = not kids <= sessions
        sessions |= kids
    return sessions, sorted(pid for pid, (_, s) in procs.items() if s in sessions)


def _start(stack: Stack, name: str, argv: list[str], env: dict[str, str], cwd: Path) -> subprocess.Popen[bytes]:
    log = stack.dir / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("ab") as fh:
        proc = subprocess.Popen(argv, cwd=cwd, env=env, stdout=fh, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    pids = _read_pids(stack) + [{"name": name, "pid": proc.pid, "log": str(log)}]
    (stack.dir / PIDS).write_text(json.dumps(pids, indent=2) + "\n")
    return proc


def _wait_http(url: str, proc: subprocess.Popen[bytes], name: str, log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"{name} exited with code {proc.returncode} while starting; see {log}:\n"
                             + _tail(log))
        try:
            with urllib.request.urlopen(url, timeout=2) as r:  # noqa: S310 (a loopback URL we built)
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise StackError(f"{name} did not answer {url} within {timeout:g} s; see {log}:\n" + _tail(log))


def _tail(log: Path, n: int = 20) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-n:]) if log.exists() else ""


def _run(argv: list[str], cwd: Path, env: dict[str, str], what: str) -> str:
    done = subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise StackError(f"{what} failed ({' '.join(argv)}, exit {done.returncode}):\n"
                         f"{(done.stdout + done.stderr)[-3000:]}")
    return done.stdout


# --- up / down ------------------------------------------------------------------------------------

def _dvc_remote(repo: Path, remote: Path, env: dict[str, str]) -> None:
    """The stack's remote as this repo's default, in .dvc/config.local (not the committed config)."""
    bindir = Path(sys.executable).parent
    _run([str(bindir / "dvc"), "remote", "add", "--local", "--force", "--default", "stack", str(remote)], repo, env,
         f"setting the DVC remote in {repo}")


def _clone(stack: Stack, env: dict[str, str]) -> None:
    if (stack.gpu_clone / ".git").is_dir():
        _run(["git", "fetch", "--quiet", "origin"], stack.gpu_clone, env, "updating the gpu clone")
    else:
        _run(["git", "clone", "--quiet", str(stack.root), str(stack.gpu_clone)], stack.root, env,
             "cloning the workspace for the gpu worker")


def up(stack: Stack) -> None:
    """Start the stack (see the module docstring); on any failure, stop what started and raise."""
    running = [p for p in _read_pids(stack) if _alive(int(p["pid"]))]  # type: ignore[arg-type]
    if running:
        raise StackError(f"a stack is already up in {stack.dir} ({', '.join(str(p['name']) for p in running)}); "
                         "stop it first: make stack-down")
    stack.dir.mkdir(exist_ok=True)
    (stack.dir / ".gitignore").write_text("*\n")
    (stack.dir / PIDS).unlink(missing_ok=True)
    env = stack.env()
    bindir = Path(sys.executable).parent
    try:
        server = _start(stack, "prefect-server", [str(bindir / "prefect"), "server", "start", "--host", "127.0.0.1",
                                                  "--port", str(stack.prefect_port)], env, stack.dir)
        mlflow_dir = stack.dir / "mlflow"
        mlflow_dir.mkdir(exist_ok=True)
        tracker = _start(stack, "mlflow-server", [
            str(bindir / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(stack.mlflow_port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{mlflow_dir / 'mlflow.db'}",
            "--artifacts-destination", str(mlflow_dir / "artifacts")], env, mlflow_dir)
        _wait_http(f"{stack.api_url}/health", server, "the Prefect server", stack.dir / "logs/prefect-server.log")
        _wait_http(f"{stack.tracking_uri}/health", tracker, "the MLflow server", stack.dir / "logs/mlflow-server.log")
        remote = stack.dir / "dvc-remote"
        remote.mkdir(exist_ok=True)
        _clone(stack, env)
        for repo in (stack.root, stack.gpu_clone):
            _dvc_remote(repo, remote, env)
        prefect = str(bindir / "prefect")
        for pool in ("cpu", "gpu"):
            _run([prefect, "work-pool", "create", pool, "--type", "process", "--overwrite"], stack.root, env,
                 f"creating work pool '{pool}'")
        _run([prefect, "--no-prompt", "deploy", "--all"], stack.root, env, "creating the deployments of prefect.yaml")
        _run([prefect, "automation", "create", "--from-file", str(stack.root / AUTOMATIONS)], stack.root, env,
             f"creating the automations of {AUTOMATIONS}")
        for pool in POOLS:
            start_worker(stack, pool)
        _write_env(stack)
    except BaseException:
        down(stack)
        raise


def start_worker(stack: Stack, pool: str) -> subprocess.Popen[bytes]:
    """Start the process worker of work pool `pool` (`cpu`: runs in this workspace; `gpu`: in
    the gpu clone, importing its own checkout's code, never this workspace's)."""
    workdir = stack.root if pool == "cpu" else stack.gpu_clone
    env = stack.env(LMFORGE_WORKDIR=str(workdir),
                    PYTHONPATH=os.pathsep.join([str(workdir / "lib"), str(workdir)]))
    prefect = str(Path(sys.executable).parent / "prefect")
    return _start(stack, f"worker-{pool}", [prefect, "worker", "start", "--pool", pool, "--limit", "1"], env, workdir)


def kill_worker(stack: Stack, pool: str) -> list[int]:
    """SIGKILL pool `pool`'s worker with every process under it (its flow run, `dvc repro`, the
    stage): what a GPU host's power cut does. Returns the pids killed. Its flow run is left
    Running on the server until the heartbeat automation marks it Crashed."""
    name = f"worker-{pool}"
    entries = _read_pids(stack)
    entry = next((p for p in reversed(entries) if p["name"] == name), None)
    if entry is None:
        raise StackError(f"no {name} in {stack.dir / PIDS}; is the stack up?")
    sid = int(entry["pid"])  # type: ignore[arg-type]
    # A power cut stops every process at once; signals go out one by one. Freeze them all
    # first, so that none sees another die and acts on it (a flow run reporting its stage
    # Failed, `dvc repro` rewriting its lock file) before the SIGKILL reaches it too.
    killed = _freeze(sid)
    _stop_family(sid, name, (signal.SIGKILL,), 5.0)
    (stack.dir / PIDS).write_text(json.dumps([p for p in entries if p is not entry], indent=2) + "\n")
    return killed


def _freeze(sid: int) -> list[int]:
    """SIGSTOP every process of `sid`'s family, newcomers included, until none is left running;
    return them."""
    sessions, members = family(sid)
    stopped: set[int] = set()
    while set(members) - stopped:
        for pid in set(members) - stopped:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
            stopped.add(pid)
        sessions, members = family(sid, sessions)  # one forked before its parent stopped
    return members


def _write_env(stack: Stack) -> None:
    lines = [f"export {k}={v}" for k, v in sorted(OFFLINE.items())]
    lines += [f"export PREFECT_API_URL={stack.api_url}", f"export MLFLOW_TRACKING_URI={stack.tracking_uri}",
              f"export PREFECT_HOME={stack.dir / 'prefect'}"]
    (stack.dir / "env").write_text("\n".join(lines) + "\n")


def _stop_family(sid: int, name: str, signals: tuple[signal.Signals, ...], timeout: float) -> None:
    """Send each signal in turn to every process of `sid`'s family (see `family`), each process
    once, newcomers included, until none is left; raise if one outlives the last signal."""
    sessions, members = family(sid)
    for sig in signals:
        deadline = time.monotonic() + (timeout if sig == signal.SIGTERM else 5.0)
        sent: set[int] = set()
        while members and time.monotonic() < deadline:
            for pid in set(members) - sent:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
                sent.add(pid)
            time.sleep(0.2)
            sessions, members = family(sid, sessions)
        if not members:
            break
    if members:
        raise StackError(f"{name} (session {sid}) still has processes {members} after {signals[-1].name}")
    with contextlib.suppress(ChildProcessError):  # reap it when this process started it (tests)
        os.waitpid(sid, os.WNOHANG)


def down(stack: Stack, timeout: float = 30.0) -> list[str]:
    """Stop every process `up` started (workers first, each with its whole session); return their
    names. Raises if one outlives SIGKILL."""
    procs = _read_pids(stack)
    stopped = []
    for p in reversed(procs):  # workers, then MLflow, then Prefect
        sid, name = int(p["pid"]), str(p["name"])  # type: ignore[arg-type]
        _stop_family(sid, name, (signal.SIGTERM, signal.SIGKILL), timeout)
        stopped.append(name)
    (stack.dir / PIDS).unlink(missing_ok=True)
    (stack.dir / "env").unlink(missing_ok=True)
    return stopped


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pipelines.stack", description=__doc__.split("\n\n")[0])
    p.add_argument("action", choices=["up", "down", "kill-worker", "start-worker"],
                   help="kill-worker / start-worker POOL: SIGKILL a worker with its runs (a host lost), start it again")
    p.add_argument("pool", nargs="?", choices=POOLS, help="the worker's pool, for kill-worker and start-worker")
    p.add_argument("--root", default=".", help="the workspace (default: the current directory)")
    p.add_argument("--prefect-port", type=int, default=int(os.environ.get("LMFORGE_STACK_PREFECT_PORT", 4200)))
    p.add_argument("--mlflow-port", type=int, default=int(os.environ.get("LMFORGE_STACK_MLFLOW_PORT", 5000)))
    args = p.parse_args(argv)
    stack = Stack(Path(args.root).resolve(), args.prefect_port, args.mlflow_port)
    try:
        if args.action == "up":
            up(stack)
            print(f"stack up: Prefect {stack.api_url}, MLflow {stack.tracking_uri}, DVC remote {stack.dir / 'dvc-remote'}, "
                  f"workers on pools cpu ({stack.root}) and gpu ({stack.gpu_clone}).\n"
                  f"  source {stack.dir / 'env'}\n  prefect deployment run lmforge-pipeline/default --watch")
        elif args.action == "down":
            print(f"stack down: stopped {', '.join(down(stack)) or 'nothing (no stack was up)'}")
        elif args.pool is None:
            p.error(f"{args.action} needs a pool: {' or '.join(POOLS)}")
        elif args.action == "kill-worker":
            print(f"killed worker-{args.pool} and its runs: pids {kill_worker(stack, args.pool)}")
        else:
            print(f"started worker-{args.pool} (pid {start_worker(stack, args.pool).pid})")
    except LmforgeError as e:
        print(f"lmforge stack: error: {e}", file=sys.stderr)
        return e.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main())
