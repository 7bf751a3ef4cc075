"""A model directory: the weights, the config and the tokenizer, self-contained and checksummed.

    model/
      model.safetensors     the state dict (Hugging Face names; a tied head stored once)
      config.json           {"format": "lmforge-model", "model": ModelConfig, "files": {name: sha256},
                             "tokenizer": {"source": path it was copied from, "sha256": digest}, ...}
      tokenizer/            a copy of the tokenizer the model was trained with

    from lmforge.weights import save_model, load_model
    save_model(model, "out/model", tokenizer_dir="data/tokenizer/tokenizer")
    model, info = load_model("out/model")      # checks every file against its sha256 first

Weights never go through pickle. A file whose digest disagrees with config.json is refused,
naming the file: a damaged model is never loaded silently.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from pydantic import ValidationError
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .config import validation_lines
from .digest import sha256_path
from .errors import InputError
from .inputs import read_json_object
from .model import GPT, ModelConfig

FORMAT = "lmforge-model"
FORMAT_VERSION = 1
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
TOKENIZER_DIR = "tokenizer"


def state_for_save(model: GPT) -> dict[str, torch.Tensor]:
    """The state dict with a tied head dropped (safetensors refuses shared storage), contiguous."""
    state = model.state_dict()
    if model.config.tie_embeddings:
        state.pop("lm_head.weight", None)
    return {k: v.detach().contiguous() for k, v in state.items()}


def save_model(model: GPT, out_dir: str | Path, *, tokenizer_dir: str | Path | None = None,
               extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Write a model directory into `out_dir` (a fresh or staging directory); return config.json."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file(state_for_save(model), str(out / WEIGHTS_FILE), metadata={"format": FORMAT})
    meta: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "model": model.config.model_dump(mode="json"),
        "n_params": model.config.n_params(),
        "files": {WEIGHTS_FILE: sha256_path(out / WEIGHTS_FILE)},
    }
    if tokenizer_dir is not None:
        src = Path(tokenizer_dir)
        shutil.copytree(src, out / TOKENIZER_DIR, dirs_exist_ok=False)
        # relative to the working directory (the repo root for a stage), so the file is the
        # same in every clone
        source = Path(os.path.relpath(src)) if src.is_absolute() else src
        meta["tokenizer"] = {"source": source.as_posix(), "sha256": sha256_path(out / TOKENIZER_DIR)}
    if extra:
        meta.update(extra)
    (out / CONFIG_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


_RERUN = "re-run the stage that wrote the model (dvc repro)"


def read_config(model_dir: str | Path) -> dict[str, Any]:
    """config.json of a model directory, with the fields lmforge reads checked for type."""
    path = Path(model_dir) / CONFIG_FILE
    meta = read_json_object(path, fix=_RERUN,
                            missing="point at a directory written by the pretrain stage, e.g. data/pretrain/model")
    if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
        raise InputError(path, f"format {meta.get('format')!r} v{meta.get('format_version')!r}, expected "
                         f"{FORMAT!r} v{FORMAT_VERSION}", fix="re-run the stage that wrote it with this lmforge")
    for key, kind in (("model", dict), ("files", dict)):
        if key not in meta:
            raise InputError(path, f"key '{key}' is missing", fix=_RERUN)
        if not isinstance(meta[key], kind):
            raise InputError(path, f"key '{key}' must be an object, got {type(meta[key]).__name__}", fix=_RERUN)
    for name, digest in meta["files"].items():
        if not isinstance(digest, str):
            raise InputError(path, f"key 'files.{name}' must be a sha256 string, got {type(digest).__name__}",
                             fix=_RERUN)
    tok = meta.get("tokenizer")
    if tok is not None and not (isinstance(tok, dict) and isinstance(tok.get("sha256"), str)):
        raise InputError(path, "key 'tokenizer' must be an object with a 'sha256' string", fix=_RERUN)
    return meta


def model_config(model_dir: str | Path, meta: dict[str, Any]) -> ModelConfig:
    """The ModelConfig in config.json's 'model', or an InputError naming each bad key."""
    try:
        return ModelConfig.model_validate(meta["model"])
    except ValidationError as err:
        raise InputError(Path(model_dir) / CONFIG_FILE,
                         "invalid model shape: " + "; ".join(validation_lines(err, ModelConfig, "model")),
                         fix=_RERUN) from None


def verify(model_dir: str | Path, meta: dict[str, Any]) -> None:
    """Check every file config.json lists (and the tokenizer copy) against its sha256."""
    root = Path(model_dir)
    for name, digest in sorted(meta.get("files", {}).items()):
        path = root / name
        if not path.exists():
            raise InputError(path, "missing", fix="re-run the stage that wrote the model")
        if sha256_path(path) != digest:
            raise InputError(path, "sha256 does not match config.json: the file is damaged or was changed",
                             fix=_RERUN)
    tok = meta.get("tokenizer")
    if tok and sha256_path(root / TOKENIZER_DIR) != tok["sha256"]:
        raise InputError(root / TOKENIZER_DIR, "sha256 does not match config.json", fix=_RERUN)


def check_tensors(path: Path, state: dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Every tensor in `state` has the shape `model` expects and a floating-point dtype:
    load_state_dict would silently cast an integer tensor, and fail with a bare RuntimeError on a
    shape that disagrees with the config."""
    own = model.state_dict()
    for name, t in sorted(state.items()):
        want = own.get(name)
        if want is None:
            continue  # an unexpected name is reported with the missing ones by the caller
        if tuple(t.shape) != tuple(want.shape):
            raise InputError(path, f"tensor {name} has shape {tuple(t.shape)}, config.json's model shape gives "
                             f"{tuple(want.shape)}", fix=_RERUN)
        if not t.is_floating_point():
            raise InputError(path, f"tensor {name} has dtype {t.dtype}, expected a floating-point dtype",
                             fix=_RERUN)


def load_state(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise InputError(path, f"not a readable safetensors file ({e})", fix="re-run the stage that wrote it") from None


def load_model(model_dir: str | Path, *, device: str | torch.device = "cpu") -> tuple[GPT, dict[str, Any]]:
    """The model in `model_dir` (verified, eval mode) and its config.json."""
    root = Path(model_dir)
    meta = read_config(root)
    verify(root, meta)
    cfg = model_config(root, meta)
    model = GPT(cfg, init=False)
    state = load_state(root / WEIGHTS_FILE)
    check_tensors(root / WEIGHTS_FILE, state, model)
    if cfg.tie_embeddings and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise InputError(root / WEIGHTS_FILE, f"tensors do not match the config: missing {missing}, unexpected {unexpected}",
                         fix="re-run the stage that wrote the model")
    return model.to(device).eval(), meta


def tokenizer_path(model_dir: str | Path) -> Path:
    """The tokenizer directory shipped inside a model directory."""
    path = Path(model_dir) / TOKENIZER_DIR
    if not (path / "tokenizer.json").is_file():
        raise InputError(path, "the model directory has no tokenizer", fix="re-run the stage that wrote the model")
    return path
