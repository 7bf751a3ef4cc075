"""The DAG as declared in dvc.yaml: stage specs, params, the pipeline key.

dvc.yaml is the only file that lists stages and their inputs and outputs; this module
reads it (plain YAML, so a stage process pays no DVC import) for the stage wrapper and the
Prefect flow.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import field_validator

from lmforge.audit import AuditLog
from lmforge.config import Config, build, read_yaml
from lmforge.digest import sha256_json
from lmforge.errors import ConfigError
from lmforge.runtime import code_version

DVC_FILE = "dvc.yaml"
PARAMS_FILE = "params.yaml"
DATA_DIR = "data"


class PipelineConfig(Config):
    """The `pipeline:` section of params.yaml: settings shared by every stage and the drivers."""

    audit_log: str = "audit/log.jsonl"
    mlflow_experiment: str = "lmforge"
    # Ed25519 private key (PEM, mode 0600) that signs every new audit head into audit/head.sig;
    # "" leaves the chain unsigned. `~` is expanded; a relative path is taken from the repo root.
    audit_signing_key: str = ""
    # Its public half: what `lmforge audit verify` checks signatures with. Optional where the
    # signing key is set (the public half is derived), but an auditor's clone has only this.
    audit_public_key: str = ""

    @field_validator("audit_signing_key", "audit_public_key")
    @classmethod
    def _key_path(cls, v: str) -> str:
        if v != v.strip():
            raise ValueError(f"{v!r} has leading or trailing spaces; give the key file's path exactly")
        if v.endswith(("/", "\\")):
            raise ValueError(f"{v!r} is a directory; give the key file's path")
        return v


def pipeline_config(root: str | Path) -> PipelineConfig:
    return build(PipelineConfig, params(root).get("pipeline"), f"{PARAMS_FILE}: pipeline")


def audit_log(root: str | Path, pipe: PipelineConfig | None = None) -> AuditLog:
    """The workspace's audit chain (pipeline.audit_log); it signs every new head when
    pipeline.audit_signing_key is set. A missing, unreadable, non-Ed25519 or too-open key, or a
    public key that is not the signing key's other half, raises ConfigError naming the file and
    the params key, so a stage fails before any work rather than after it (unsigned)."""
    pipe = pipe or pipeline_config(root)
    signer = None
    if pipe.audit_signing_key:
        from lmforge.signing import Signer, key_id, load_public_key, resolve

        where = f"{PARAMS_FILE}: pipeline.audit_signing_key"
        signer = Signer.from_file(resolve(pipe.audit_signing_key, root), where)
        if pipe.audit_public_key:
            pub_where = f"{PARAMS_FILE}: pipeline.audit_public_key"
            pub_path = resolve(pipe.audit_public_key, root)
            pub = key_id(load_public_key(pub_path, pub_where))
            if pub != signer.key_id:
                raise ConfigError(
                    f"{pub_where} ({pub_path}, key {pub}) is not the public half of {where} ({signer.source}, "
                    f"key {signer.key_id}): every signature would fail to verify (fix: point both at one pair "
                    "made by `lmforge audit keygen --out PATH`: PATH and PATH.pub)"
                )
    return AuditLog(Path(root) / pipe.audit_log, signer=signer)


@dataclass(frozen=True)
class StageSpec:
    name: str
    cmd: str
    deps: tuple[str, ...]
    outs: tuple[str, ...]
    metrics: tuple[str, ...]
    plots: tuple[str, ...]
    params: tuple[str, ...]
    runner: str
    gpus: int
    model: str | None = None               # meta.model: the output that is a model (an MLflow LoggedModel)
    register: dict[str, str] | None = None  # meta.register: {name, alias} in the MLflow model registry
    parent_artifacts: tuple[str, ...] = ()  # meta.parent_artifacts: outputs logged on the pipeline's MLflow run

    @property
    def out_dir(self) -> str:
        return f"{DATA_DIR}/{self.name}"

    @property
    def data_deps(self) -> tuple[str, ...]:
        """Dependencies that are data (under data/), as opposed to code."""
        return tuple(d for d in self.deps if d == DATA_DIR or d.startswith(f"{DATA_DIR}/"))

    @property
    def all_outs(self) -> tuple[str, ...]:
        return self.outs + self.metrics + self.plots


def _paths(entries: list[Any] | None) -> tuple[str, ...]:
    """dvc.yaml lists outs either as strings or as {path: {options}} mappings."""
    out = []
    for e in entries or []:
        out.append(next(iter(e)) if isinstance(e, dict) else str(e))
    return tuple(out)


def _params(entries: list[Any] | None) -> tuple[str, ...]:
    out: list[str] = []
    for e in entries or []:
        if isinstance(e, dict):  # {params-file: [keys]}
            for keys in e.values():
                out.extend(keys or [])
        else:
            out.append(str(e))
    return tuple(out)


def load_stages(root: str | Path) -> dict[str, StageSpec]:
    path = Path(root) / DVC_FILE
    data = read_yaml(path)
    stages = data.get("stages")
    if not isinstance(stages, dict) or not stages:
        raise ConfigError(f"{path}: no 'stages:' mapping")
    specs = {}
    for name, s in stages.items():
        meta = s.get("meta") or {}
        runner = meta.get("runner", "cpu")
        if runner not in ("cpu", "gpu"):
            raise ConfigError(f"{path}: stages.{name}.meta.runner must be 'cpu' or 'gpu', got {runner!r}")
        gpus = meta.get("gpus", 0)
        if not isinstance(gpus, int) or isinstance(gpus, bool) or gpus < 0:
            raise ConfigError(f"{path}: stages.{name}.meta.gpus must be a whole number >= 0 (the GPUs, i.e. "
                              f"data-parallel processes, the stage trains on), got {gpus!r}")
        specs[name] = StageSpec(
            name=name,
            cmd=str(s.get("cmd", "")),
            deps=_paths(s.get("deps")),
            outs=_paths(s.get("outs")),
            metrics=_paths(s.get("metrics")),
            plots=_paths(s.get("plots")),
            params=_params(s.get("params")),
            runner=runner,
            gpus=gpus,
            model=meta.get("model"),
            register=meta.get("register"),
            parent_artifacts=tuple(meta.get("parent_artifacts") or ()),
        )
        _check_model_meta(path, specs[name])
    return specs


def _check_model_meta(path: Path, spec: StageSpec) -> None:
    where = f"{path}: stages.{spec.name}.meta"
    if spec.model is not None and spec.model not in spec.outs:
        raise ConfigError(f"{where}.model {spec.model!r} must be one of the stage's outs {list(spec.outs)}")
    if spec.register is not None:
        r = spec.register
        if spec.model is None:
            raise ConfigError(f"{where}.register needs meta.model (the output to register)")
        if not isinstance(r, dict) or set(r) != {"name", "alias"} or not all(isinstance(v, str) and v for v in r.values()):
            raise ConfigError(f"{where}.register must be {{name: <registered model>, alias: <alias>}}, got {r!r}")
    for artifact in spec.parent_artifacts:
        if artifact not in spec.all_outs:
            raise ConfigError(f"{where}.parent_artifacts: {artifact!r} must be one of the stage's outputs "
                              f"{list(spec.all_outs)}")


def load_stage(root: str | Path, name: str) -> StageSpec:
    specs = load_stages(root)
    if name not in specs:
        raise ConfigError(f"{Path(root) / DVC_FILE}: no stage named '{name}' (stages: {', '.join(specs)})")
    return specs[name]


def params(root: str | Path) -> dict[str, Any]:
    return read_yaml(Path(root) / PARAMS_FILE)


def pipeline_key(root: str | Path) -> str:
    """What makes two stage processes parts of the same pipeline run under plain `dvc repro`:
    the same commit and the same params.

    The dirty flag is left out on purpose: a run itself dirties the tree (dvc.lock, the
    .gitignore files DVC writes), which would split one run over several parents.
    """
    commit = code_version(root)["commit"]
    return sha256_json({"commit": commit, "params": params(root)})[:32]
