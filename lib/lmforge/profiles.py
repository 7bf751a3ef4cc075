"""Profiles: named overrides of params.yaml (profiles/<name>.yaml), applied in place.

    lmforge profile apply ci          # params.yaml <- params.yaml deep-merged with profiles/ci.yaml

The merge keeps params.yaml's comments and key order (ruamel round-trip), refuses keys the
profile invents (a typo would otherwise be silently ignored), and writes atomically.
Lists (e.g. mix.sources) are replaced whole; to change one source, a profile repeats the list.
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


def apply(params: str | Path, profile_path: str | Path) -> None:
    override = read_yaml(profile_path)
    yaml = YAML()
    yaml.preserve_quotes = True
    params = Path(params)
    base = yaml.load(params.read_text(encoding="utf-8"))
    try:
        _merge_into(base, override, "")
    except ConfigError as e:
        raise ConfigError(f"{profile_path}: {e}") from None
    buf = io.StringIO()
    yaml.dump(base, buf)
    atomic.write_text(params, buf.getvalue())


def cli_apply(args: argparse.Namespace) -> int:
    path = resolve(args.profile, args.profiles_dir)
    apply(args.params, path)
    print(f"applied {path} to {args.params}")
    return 0
