"""The one stage wrapper: every `stages/<name>.py` is `main("<name>", Config, run)`.

It does DESIGN.md's seven steps in order, the same for every stage:
1. load and validate the stage's params section into its frozen config (before any work);
2. resolve the stage's data inputs from dvc.yaml and check they exist; digest them;
3. open an MLflow child run under the pipeline's parent; log params and input digests;
4. run the library's `run(cfg, inputs, out_dir[, ctx])` into a private staging directory
   (`ctx` is a lmforge.context.RunContext: step metrics, timings, a scratch dir for checkpoints);
5. check the staging directory holds exactly the outputs dvc.yaml declares, then swap it in for
   data/<stage>/ with one rename: an interrupted stage leaves the old set of outputs or none,
   never a torn file and never a mix of old and new outputs;
6. log metrics (metrics.json also becomes the DVC metric), timings and artifacts;
7. append the run's decision records (ctx.decisions) and one stage record to the audit chain, and
   anchor its head on the MLflow runs. A run that a policy refused (lmforge.errors.Refused, e.g.
   the forgetting gate) fails, but its decision records are appended first.

Run a stage directly with `python -m stages.<name>` from the repo root (that is what
dvc.yaml's `cmd` does).

Data parallel: a training stage (`main(..., data_parallel=True)`) whose dvc.yaml entry has
`meta.gpus: N` > 1 (or that runs with LMFORGE_GPUS=N, a worker's override) replaces itself with
`torchrun --standalone --nproc_per_node=N -m stages.<name>`: one process per GPU (NCCL), or N gloo
processes on a machine without CUDA. Under torchrun (one node, or several nodes launched by the
user), rank 0 does all seven steps; every other rank only runs the library alongside it (sharing
the scratch dir) and writes, tracks and audits nothing. `meta` is not part of DVC's stage hash
and the outputs do not depend on N at equal global batch, so N is placement, not a parameter.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from lmforge import atomic, lineage, tracking
from lmforge.audit import AuditLog, build_stage_record
from lmforge.config import StageConfig, build
from lmforge.context import RunContext
from lmforge.curves import Curves
from lmforge.digest import sha256_file, sha256_json, sha256_path
from lmforge.errors import ConfigError, InputError, LmforgeError, Refused
from lmforge.runtime import code_version, environment
from stages import dag

RUNNER_ENV = "LMFORGE_RUNNER"
GPUS_ENV = "LMFORGE_GPUS"  # a worker's override of meta.gpus (its host's GPU count)
STAGING = ".{}.staging-{}"  # data/.<stage>.staging-<pid>: a sibling of data/<stage>/
SCRATCH_DIR = ".lmforge/scratch"  # per-stage resumable state (checkpoints), outside DVC outputs
CURVES = "curves"  # data/<stage>/curves/: the step metrics as CSV, when dvc.yaml lists it under plots

RunFn = Callable[..., Mapping[str, Any]]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _inputs(root: Path, spec: dag.StageSpec) -> dict[str, Path]:
    """Data deps keyed by their path under data/ ('sources', 'mix/train', ...).

    An upstream stage's directory is also given under the stage's name ('mix' for
    data/mix/train), so a library reads `inputs["mix"] / "train"` without knowing data/.
    """
    inputs: dict[str, Path] = {}
    for dep in spec.data_deps:
        path = root / dep
        rel = dep.removeprefix(f"{dag.DATA_DIR}/")
        if not path.exists():
            raise InputError(dep, "input does not exist", fix=f"run the upstream stage first: dvc repro {rel.split('/')[0]}")
        inputs[rel] = path
        if "/" in rel:
            inputs.setdefault(rel.split("/")[0], root / dag.DATA_DIR / rel.split("/")[0])
    return inputs


def _check_declared(root: Path, spec: dag.StageSpec, cfg: StageConfig) -> None:
    """Every local file a config points at must sit under one of the stage's dvc.yaml deps, or
    DVC would not re-run the stage when it changes and the audit would not digest it."""
    paths = cfg.input_paths() if hasattr(cfg, "input_paths") else []
    deps = [(root / d).resolve() for d in spec.deps]
    for p in paths:
        full = (root / p).resolve()
        if not any(full == d or d in full.parents for d in deps):
            raise ConfigError(
                f"{dag.PARAMS_FILE}: {spec.name} reads {p}, which is not under any dependency of stage "
                f"'{spec.name}' (fix: add it, or a directory holding it, to stages.{spec.name}.deps in "
                f"{dag.DVC_FILE})"
            )


def _check_outputs(staging: Path, spec: dag.StageSpec) -> None:
    declared = {Path(o).relative_to(spec.out_dir).parts[0] for o in spec.all_outs}
    missing = sorted(o for o in spec.all_outs if not (staging / Path(o).relative_to(spec.out_dir)).exists())
    extra = sorted(p.name for p in staging.iterdir() if p.name not in declared)
    if missing or extra:
        raise LmforgeError(
            f"stage '{spec.name}' broke its output contract: "
            + (f"declared in dvc.yaml but not written: {missing}; " if missing else "")
            + (f"written but not declared in dvc.yaml: {extra}" if extra else "")
        )


def _publish(staging: Path, root: Path, spec: dag.StageSpec) -> None:
    """Swap the staged set of outputs in for data/<stage>/ as a whole (one directory rename)."""
    target = root / spec.out_dir
    gitignore = target / ".gitignore"  # DVC's, listing the outputs for git
    if gitignore.exists():
        shutil.copy2(gitignore, staging / ".gitignore")
    atomic.replace(staging, target)


def _clean_stale(root: Path, name: str) -> None:
    """Leftovers of killed runs: a staging dir, or the temp/old names of an interrupted swap
    (lmforge.atomic). Siblings of data/<stage>/, hidden and undeclared: DVC never sees them."""
    data = root / dag.DATA_DIR
    for pattern in (STAGING.format(name, "*"), f".{name}.tmp-*", f".{name}.old-*"):
        for p in data.glob(pattern):
            atomic.remove(p)


def _validate_layout(spec: dag.StageSpec) -> None:
    for out in spec.all_outs:
        if not out.startswith(spec.out_dir + "/"):
            raise LmforgeError(f"dvc.yaml: stage '{spec.name}' output {out!r} must live under {spec.out_dir}/")
    metrics = f"{spec.out_dir}/metrics.json"
    if metrics not in spec.metrics:
        raise LmforgeError(f"dvc.yaml: stage '{spec.name}' must declare {metrics} under metrics:")


def _run_and_publish(
    run: RunFn, cfg: StageConfig, inputs: dict[str, Path], ctx: RunContext, spec: dag.StageSpec, root: Path,
    curves: Curves | None = None,
) -> dict[str, Any]:
    """Steps 4 and 5: run into a private staging dir, check the output contract, publish."""
    staging = root / dag.DATA_DIR / STAGING.format(spec.name, os.getpid())
    staging.mkdir(parents=True)
    try:
        kwargs = {"ctx": ctx} if "ctx" in inspect.signature(run).parameters else {}
        metrics = dict(run(cfg, inputs, staging, **kwargs))
        # metrics.json holds only deterministic values (it is a DVC metric); timings go to MLflow.
        (staging / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        if curves is not None:
            curves.write(staging / CURVES)
        _check_outputs(staging, spec)
        _publish(staging, root, spec)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return metrics


def _code_digests(root: Path, spec: dag.StageSpec) -> dict[str, str]:
    """Digests of the stage's non-data deps (its code), bytecode caches left out."""
    out = {}
    for dep in spec.deps:
        if dep in spec.data_deps:
            continue
        path = root / dep
        files = [path] if path.is_file() else sorted(
            p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith("."))
        out[dep] = sha256_json([[p.relative_to(root).as_posix(), sha256_file(p)] for p in files])
    return out


def _rank() -> int:
    """This process's rank under torchrun (0 otherwise)."""
    return int(os.environ.get("RANK", "0"))


def _follow(run: RunFn, cfg: StageConfig, inputs: dict[str, Path], scratch: Path) -> dict[str, Any]:
    """A data-parallel worker other than rank 0: it trains alongside rank 0 (sharing the scratch
    dir for resume) but tracks, publishes and audits nothing; rank 0 does all of that."""
    with tempfile.TemporaryDirectory(prefix="lmforge-rank-") as out:
        return dict(run(cfg, inputs, Path(out), ctx=RunContext(scratch=scratch)))


def processes(name: str, spec: dag.StageSpec | None, data_parallel: bool) -> int:
    """How many data-parallel processes stage `name` runs: LMFORGE_GPUS when set (a worker's
    override for its host), else dvc.yaml's meta.gpus; 1 when neither asks for more."""
    raw = os.environ.get(GPUS_ENV, "").strip()
    if raw:
        where = f"{GPUS_ENV}={raw}"
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"{where}: give a whole number of processes >= 1, or unset it to use "
                              f"dvc.yaml's stages.{name}.meta.gpus")
        n = int(raw)
    else:
        n = max(spec.gpus, 1) if spec is not None else 1
        where = f"{dag.DVC_FILE}: stages.{name}.meta.gpus: {n}"
    if n > 1 and not data_parallel:
        if raw:
            return 1  # a worker-wide setting: it concerns the stages that train, not this one
        raise ConfigError(f"{where}: stage '{name}' does not train data-parallel; set it to 1 or remove it")
    if n > 1:
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() < n:
            visible = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
            raise ConfigError(f"{where} asks for {n} GPUs but this machine sees {torch.cuda.device_count()} "
                              f"(CUDA_VISIBLE_DEVICES={visible}); lower it, or set {GPUS_ENV} to the GPUs this "
                              "worker has")
    return n


def _relaunch_under_torchrun(name: str, root: Path, data_parallel: bool) -> None:
    """`python -m stages.<name>` that should run N > 1 processes replaces itself with
    `torchrun --standalone --nproc_per_node=N -m stages.<name>` (one node). Multi-node runs
    call torchrun themselves with their rendezvous settings; the stage then runs as launched."""
    if "LOCAL_RANK" in os.environ:
        return
    n = processes(name, dag.load_stages(root).get(name), data_parallel)
    if n > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={n}",
               "-m", f"stages.{name}"]
        sys.stdout.flush()
        sys.stderr.flush()
        os.execv(sys.executable, cmd)


def _audit_state(audit: AuditLog) -> dict[str, Any] | None:
    """The chain as this stage finds it (verified): what a stage may cite, e.g. in a model card."""
    chain = audit.chain_id()
    if chain is None:
        return None
    report = audit.verify()
    return {"chain_id": chain, "count": report.count, "head_hash": report.head_hash, "verified": report.ok}


def _append(audit: AuditLog, records: list[dict[str, Any]], runs: tuple[str, ...]) -> None:
    """Append `records` to the audit chain in order and anchor its new head on the MLflow `runs`."""
    appended = None
    for r in records:
        appended = audit.append(r)
    if appended is not None:
        anchor = {"audit.chain_id": audit.chain_id(), "audit.head_hash": appended["hash"],
                  "audit.count": str(appended["seq"] + 1)}
        for run_id in runs:
            tracking.set_tags(run_id, anchor)


def _log_models(root: Path, exp_id: str, run_id: str, spec: dag.StageSpec, inputs: dict[str, str],
                outputs: dict[str, str], code: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Step 6's models: the stage's model (meta.model) as an MLflow LoggedModel linked to the
    models it came from, registered under meta.register's name and alias; the registration is
    an audited decision. A stage without a model records which models it read."""
    if spec.model is None:
        lineage.log_model_inputs(exp_id, run_id, inputs)
        return []
    registered = spec.register is not None  # a release: its files go to MLflow too
    model_id, parents = lineage.log_stage_model(exp_id, run_id, spec.name, spec.model, outputs[spec.model], inputs,
                                                artifacts=root / spec.model if registered else None)
    if spec.register is None:
        return []
    tags = {lineage.SHA: outputs[spec.model], "lmforge.commit": str(code["commit"]),
            "lmforge.parents": ",".join(parents)}
    version = lineage.register(model_id, spec.register["name"], spec.register["alias"], tags)
    return [{"kind": "model.register", "name": spec.register["name"], "version": version,
             "alias": spec.register["alias"], "mlflow_model_id": model_id, "sha256": outputs[spec.model]}]


def execute(name: str, config_cls: type[StageConfig], run: RunFn, root: Path) -> dict[str, Any]:
    """Run stage `name` in the repo at `root`; return its metrics. Raises on failure."""
    t0, started = time.perf_counter(), _now()
    # 1. config, before any work
    spec = dag.load_stage(root, name)
    _validate_layout(spec)
    all_params = dag.params(root)
    pipe = dag.pipeline_config(root)
    if name not in all_params:
        raise ConfigError(f"{dag.PARAMS_FILE}: section '{name}' is missing (fix: add a '{name}:' block)")
    cfg = build(config_cls, all_params[name], f"{dag.PARAMS_FILE}: {name}")
    # 2. inputs
    _check_declared(root, spec, cfg)
    inputs = _inputs(root, spec)
    input_digests = {dep: sha256_path(root / dep) for dep in spec.data_deps}
    params_digest = cfg.digest()  # before the run: nothing the run does can change what is recorded
    # Resumable state is keyed by params, inputs and code: a run killed under other params, other
    # data or other code is never resumed by this one (its checkpoints would mix two versions).
    scratch = root / SCRATCH_DIR / name / sha256_json(
        {"params": params_digest, "inputs": input_digests, "code": _code_digests(root, spec)})[:16]
    if _rank() != 0:
        return _follow(run, cfg, inputs, scratch)
    # Before any work: a bad signing key must fail the stage now, not leave its record unsigned.
    audit = dag.audit_log(root, pipe)
    code = code_version(root)
    runner = os.environ.get(RUNNER_ENV, "dvc")
    # 3. tracking. Under plain `dvc repro` no driver owns the parent run: each stage finds it
    # by the pipeline key and leaves it FINISHED (or FAILED); the next stage attaches again.
    exp_id = tracking.configure(root, pipe.mlflow_experiment)
    owns_parent = tracking.PARENT_ENV not in os.environ
    parent = os.environ.get(tracking.PARENT_ENV) or tracking.find_or_create_parent(
        exp_id, dag.pipeline_key(root), name, tags={"lmforge.commit": str(code["commit"])}
    )
    _clean_stale(root, name)
    tags = {"lmforge.runner": runner, "lmforge.commit": str(code["commit"]), "lmforge.dirty": str(code["dirty"]),
            "lmforge.processes": os.environ.get("WORLD_SIZE", "1")}
    try:
        with tracking.child_run(exp_id, parent, name, tags) as run_id:
            tracking.log_params(run_id, cfg.model_dump(mode="json"))
            tracking.log_input_digests(input_digests)
            # 4-5. run, check, publish atomically
            steps = tracking.MetricBuffer(run_id)
            curves = Curves(scratch / "curves.jsonl") if f"{spec.out_dir}/{CURVES}" in spec.plots else None

            def sink(metrics: Mapping[str, Any], step: int) -> None:
                steps.add(metrics, step)
                if curves is not None:
                    curves.add(metrics, step)

            ctx = RunContext(scratch=scratch, sink=sink, audit=_audit_state(audit), audit_log=audit.path)

            def decisions() -> list[dict[str, Any]]:
                return [{**d, "stage": name, "mlflow_run_id": run_id} for d in ctx.decisions]

            try:
                metrics = _run_and_publish(run, cfg, inputs, ctx, spec, root, curves)
            except Refused:
                # a refusal is a decision too: it is audited though the stage fails
                _append(audit, decisions(), (run_id, parent))
                raise
            finally:
                steps.flush()
            # resumable state is only for a run that did not finish
            shutil.rmtree(root / SCRATCH_DIR / name, ignore_errors=True)
            output_digests = {o: sha256_path(root / o) for o in spec.all_outs}
            ctx.decisions.extend(_log_models(root, exp_id, run_id, spec, input_digests, output_digests, code))
            # 6. metrics, timings, artifacts
            tracking.log_metrics(run_id, {**metrics, "time": {"wall_s": time.perf_counter() - t0, **ctx.timings}})
            for artifact in (f"{spec.out_dir}/metrics.json", *spec.plots):
                tracking.log_artifact(run_id, root / artifact)
            for artifact in spec.parent_artifacts:  # e.g. the report, on the pipeline's own run
                tracking.log_artifact(parent, root / artifact)
            # 7. audit (the run's decisions, then the stage), and its head anchored on the MLflow runs
            record = build_stage_record(
                stage=name,
                inputs=input_digests,
                outputs=output_digests,
                params_digest=params_digest,
                code=code,
                environment=environment(),
                runner=runner,
                mlflow_run_id=run_id,
                started=started,
                finished=_now(),
            )
            _append(audit, [*decisions(), record], (run_id, parent))
    except BaseException:
        if owns_parent:
            tracking.set_status(parent, "FAILED")
        raise
    if owns_parent:
        tracking.set_status(parent, "FINISHED")
    return metrics


def main(name: str, config_cls: type[StageConfig], run: RunFn, *, data_parallel: bool = False) -> None:
    """Entry point of `python -m stages.<name>`: exit 0, 2 (a user-fixable error) or 1 (a bug).
    `data_parallel`: the stage trains with lmforge.train under torchrun when meta.gpus > 1."""
    try:
        _relaunch_under_torchrun(name, Path.cwd(), data_parallel)
        execute(name, config_cls, run, Path.cwd())
    except LmforgeError as e:
        print(f"lmforge {name}: error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except Exception:
        traceback.print_exc()
        print(f"lmforge {name}: failed with an unexpected error (above); please report it", file=sys.stderr)
        sys.exit(1)
