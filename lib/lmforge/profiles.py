"""Profiles: named overrides of params.yaml (profiles/<name>.yaml), applied in place.

    lmforge profile apply ci          # params.yaml <- params.yaml deep-merged with profiles/ci.yaml

The merge keeps params.yaml's comments and key order (ruamel round-trip), refuses keys the
profile invents (a typo would otherwise be silently ignored), and writes atomically.
Lists (e.g. mix.sources) are replaced whole; to change one source, a profile repeats the list.

A profile's top-level `meta:` block is not params: it sets keys of the stages' `meta` in the
dvc.yaml beside params.yaml, which say where a stage runs rather than what it computes (DVC
leaves `meta` out of a stage's hash). Only `gpus` (the data-parallel processes of a training
stage) may be set this way:

    meta:
      pretrain: {gpus: 8}
"""

from __future__ import annotations

import argparse
import io
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

from . import atomic
from .config import read_yaml
from .errors import ConfigError


def _merge_into(base: Any, override: dict[str, Any], where: str) -> None:
    for key, value in override.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in base:
            raise ConfigError(f"profile key '{path}' does not exist in params.yaml; check its spelling")
        if isinstance(value, dict) and isinstance(base[key], dict):
            _merge_into(base[key], value, path)
        else:
            base[key] = value


def resolve(profile: str, profiles_dir: str | Path) -> Path:
    p = Path(profile)
    if p.suffix in (".yaml", ".yml") or p.exists():
        return p
    named = Path(profiles_dir) / f"{profile}.yaml"
    if not named.exists():
        known = sorted(x.stem for x in Path(profiles_dir).glob("*.yaml"))
        raise ConfigError(f"no profile '{profile}' in {profiles_dir}/ (known: {', '.join(known) or 'none'})")
    return named


META_KEYS = ("gpus",)  # dvc.yaml meta keys a profile may set


def _yaml() -> YAML:
    yaml = YAML()
    yaml.preserve_quotes = True
    yaml.indent(mapping=2, sequence=4, offset=2)  # dvc.yaml's and params.yaml's layout
    yaml.width = 4096
    # null stays `null` (ruamel's round trip would write nothing after the colon)
    yaml.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml


def _dump(yaml: YAML, doc: Any) -> str:
    buf = io.StringIO()
    yaml.dump(doc, buf)
    return buf.getvalue()


def _merge_meta(dvc_doc: Any, meta: Any, where: str) -> None:
    if not isinstance(meta, dict):
        raise ConfigError(f"{where}: meta must map stage names to {{gpus: N}}")
    stages = dvc_doc.get("stages") or {}
    for stage, keys in meta.items():
        if stage not in stages:
            raise ConfigError(f"{where}: meta.{stage}: no stage '{stage}' in dvc.yaml (stages: {', '.join(stages)})")
        if not isinstance(keys, dict):
            raise ConfigError(f"{where}: meta.{stage} must be a mapping such as {{gpus: 8}}")
        for key, value in keys.items():
            if key not in META_KEYS:
                raise ConfigError(f"{where}: meta.{stage}.{key}: a profile may set only {', '.join(META_KEYS)}")
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{where}: meta.{stage}.{key}: give a whole number >= 1, got {value!r}")
            if stages[stage].get("meta") is None:
                stages[stage]["meta"] = {}
            stages[stage]["meta"][key] = value


def apply(params: str | Path, profile_path: str | Path, dvc_file: str | Path | None = None) -> None:
    """Merge the profile into params.yaml (and its `meta:` block into `dvc_file`, by default the
    dvc.yaml beside params.yaml). Both are checked before either file is written."""
    override = dict(read_yaml(profile_path))
    meta = override.pop("meta", None)
    yaml = _yaml()
    params = Path(params)
    base = yaml.load(params.read_text(encoding="utf-8"))
    writes = []
    try:
        _merge_into(base, override, "")
        if meta is not None:
            dvc_path = Path(dvc_file) if dvc_file is not None else params.with_name("dvc.yaml")
            dvc_doc = yaml.load(dvc_path.read_text(encoding="utf-8"))
            _merge_meta(dvc_doc, meta, str(dvc_path))
            writes.append((dvc_path, _dump(yaml, dvc_doc)))
    except ConfigError as e:
        raise ConfigError(f"{profile_path}: {e}") from None
    writes.append((params, _dump(yaml, base)))
    for path, text in writes:
        atomic.write_text(path, text)


def cli_apply(args: argparse.Namespace) -> int:
    path = resolve(args.profile, args.profiles_dir)
    apply(args.params, path)
    print(f"applied {path} to {args.params}")
    return 0
