"""Resumable training checkpoints: safetensors for tensors, JSON for the rest, checksummed.

A checkpoint directory `<root>/step-<N>/` holds

    model.safetensors   the model's weights (a tied head stored once)
    optim.safetensors   every tensor of every optimizer's state, plus torch's RNG states
    state.json          step, optimizer structure (param groups, scalar state), data-loader
                        position, Python and NumPy RNG states, whatever the caller adds
    manifest.json       sha256 of the three files above

and `<root>/latest.json` names the newest one. A checkpoint is written under a temporary
name and renamed into place, then `latest.json` is replaced atomically, then older ones are
deleted: a run killed at any moment leaves a complete newest checkpoint. Loading verifies
every digest first and refuses a damaged checkpoint, naming the file. No pickle anywhere.

A sharded (FSDP2) model and its optimizer state are stored whole: every process calls `save`
(the gathering is collective) and rank 0 writes (`write`); `load` cuts each process's shards
back out. So one checkpoint resumes at any process count, sharded or not.
"""

from __future__ import annotations

import json
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor

from ..atomic import atomic_path, write_text
from ..digest import sha256_path
from ..errors import InputError
from ..inputs import read_json_object
from ..weights import load_state
from .shard import full, like

LATEST = "latest.json"
FILES = ("model.safetensors", "optim.safetensors", "state.json")


def _storage(t: torch.Tensor) -> int:
    """What tied weights share: the data pointer (of this process's shard for a DTensor)."""
    return (t.to_local() if isinstance(t, DTensor) else t).data_ptr()


def _model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    seen: set[int] = set()
    out = {}
    for k, v in model.state_dict().items():
        if _storage(v) in seen:  # tied weights: keep the first name
            continue
        seen.add(_storage(v))
        out[k] = full(v.detach()).contiguous().cpu()
    return out


def _split_optimizer(i: int, opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in sd["state"].items():
        for key, val in st.items():
            if isinstance(val, torch.Tensor):
                tensors[f"opt{i}.{pid}.{key}"] = full(val.detach()).contiguous().cpu()
            else:
                scalars.setdefault(str(pid), {})[key] = val
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars,
                     "tensor_keys": sorted(tensors)}


def rng_state() -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for d, st in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{d}"] = st
    np_state = np.random.get_state(legacy=True)
    py_state = random.getstate()
    return tensors, {"numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
                     "python": [py_state[0], list(py_state[1]), py_state[2]]}


def set_rng_state(tensors: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    if torch.cuda.is_available():
        for d in range(torch.cuda.device_count()):
            if f"rng.cuda.{d}" in tensors:
                torch.cuda.set_rng_state(tensors[f"rng.cuda.{d}"], d)
    n = state["numpy"]
    np.random.set_state((n[0], np.asarray(n[1], dtype=np.uint32), *n[2:]))
    p = state["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))


def save(root: str | Path, step: int, model: torch.nn.Module, opts: list[torch.optim.Optimizer],
         extra: dict[str, Any], *, keep: int = 1, write: bool = True) -> Path:
    """Write checkpoint `step` under `root` atomically; keep the newest `keep` checkpoints.
    `write` False: only take part in gathering a sharded model's state (ranks other than 0)."""
    root = Path(root)
    name = f"step-{step:08d}"
    opt_tensors: dict[str, torch.Tensor] = {}
    groups = []
    for i, opt in enumerate(opts):
        t, g = _split_optimizer(i, opt)
        opt_tensors.update(t)
        groups.append(g)
    weights = _model_state(model)
    if not write:
        return root / name
    rng_tensors, rng_json = rng_state()
    opt_tensors.update(rng_tensors)
    with atomic_path(root / name) as tmp:
        tmp.mkdir()
        save_file(weights, str(tmp / "model.safetensors"))
        save_file(opt_tensors, str(tmp / "optim.safetensors"))
        state = {"step": step, "optimizers": groups, "rng": rng_json, **extra}
        (tmp / "state.json").write_text(json.dumps(state, sort_keys=True) + "\n")
        manifest = {f: sha256_path(tmp / f) for f in FILES}
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    write_text(root / LATEST, json.dumps({"checkpoint": name, "step": step}) + "\n")
    kept = sorted(p for p in root.glob("step-*") if p.is_dir() and not p.name.startswith("."))[-keep:]
    for p in root.glob("step-*"):
        if p not in kept:
            shutil.rmtree(p, ignore_errors=True)
    return root / name


_NAME = re.compile(r"step-\d{8,}")  # save() writes step-{step:08d}


def latest(root: str | Path) -> Path | None:
    """The newest complete checkpoint under `root`, or None if there is none."""
    path = Path(root) / LATEST
    if not path.exists():
        return None
    fix = f"delete {Path(root)} to start the stage from scratch"
    pointer = read_json_object(path, fix=fix)
    name = pointer.get("checkpoint")
    # only a step directory of this root: a pointer is never a path that leads elsewhere
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(path, f"key 'checkpoint' must name a step-NNNNNNNN directory, got {name!r}", fix=fix)
    ckpt = Path(root) / name
    if not ckpt.is_dir():
        raise InputError(ckpt, "the checkpoint latest.json names is missing", fix=fix)
    return ckpt


def verify(ckpt: Path) -> None:
    fix = f"delete {ckpt.parent} to start the stage from scratch (the damaged checkpoint is not used)"
    manifest = read_json_object(ckpt / "manifest.json", fix=fix)
    for f in FILES:
        if not isinstance(manifest.get(f), str):
            raise InputError(ckpt / "manifest.json", f"key {f!r} must be the file's sha256, got "
                             f"{manifest.get(f)!r}", fix=fix)
        if not (ckpt / f).is_file():
            raise InputError(ckpt / f, "missing from the checkpoint", fix=fix)
        if sha256_path(ckpt / f) != manifest[f]:
            raise InputError(ckpt / f, "sha256 does not match manifest.json: the checkpoint is corrupt", fix=fix)


def load(ckpt: Path, model: torch.nn.Module, opts: list[torch.optim.Optimizer]) -> dict[str, Any]:
    """Restore model, optimizers and RNG states from `ckpt` (verified first); return state.json."""
    verify(ckpt)
    state = read_json_object(ckpt / "state.json", fix=f"delete {ckpt.parent} to start the stage from scratch")
    weights = load_state(ckpt / "model.safetensors")
    own = model.state_dict()
    for k, v in own.items():  # tied weights were stored under their first name
        if k not in weights:
            twin = next((n for n, t in own.items() if n in weights and _storage(t) == _storage(v)), None)
            if twin is not None:
                weights[k] = weights[twin]
    model.load_state_dict({k: like(own[k], v) if k in own else v for k, v in weights.items()}, strict=True)
    tensors = load_state(ckpt / "optim.safetensors")
    if len(state["optimizers"]) != len(opts):
        raise InputError(ckpt / "state.json", f"{len(state['optimizers'])} optimizers saved, {len(opts)} in use",
                         fix=f"delete {ckpt.parent}: it belongs to another configuration")
    for opt, saved in zip(opts, state["optimizers"], strict=True):
        params = [p for g in opt.param_groups for p in g["params"]]  # the ids state_dict() numbers
        per_param: dict[int, dict[str, Any]] = {}
        for key in saved["tensor_keys"]:
            _, pid, name = key.split(".", 2)
            value = tensors[key]
            p = params[int(pid)] if int(pid) < len(params) else None
            if p is not None and value.shape == p.shape:  # a per-element state (moments): shard it as p
                value = like(p, value)
            per_param.setdefault(int(pid), {})[name] = value
        for pid, vals in saved["scalars"].items():
            per_param.setdefault(int(pid), {}).update(vals)
        groups = []
        for cur, g in zip(opt.state_dict()["param_groups"], saved["param_groups"], strict=True):
            groups.append({k: tuple(v) if isinstance(cur.get(k), tuple) else v for k, v in g.items()})
        opt.load_state_dict({"state": per_param, "param_groups": groups})
    set_rng_state(tensors, state["rng"])
    return state
