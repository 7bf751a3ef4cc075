"""Parameter groups for governed training: glob patterns over parameter names -> named groups.

    groups:
      - {name: embed, level: 0, patterns: ["model.embed_tokens.weight"]}
      - {name: attn, level: 1, patterns: ["model.layers.*.self_attn.*"], per_layer: true}

`partition(model, specs)` assigns every parameter tensor to exactly one group. A tensor that
no pattern matches, or that patterns of two groups match, is an error naming the tensor; so
is a pattern that matches nothing. `per_layer: true` splits a group by block index
(`model.layers.<i>.`) into groups `<name>.<i>`, each governed on its own. Levels 0-3 order the
groups coarse to fine: only level 0 trains at first (lmforge.train.governor).
"""

from __future__ import annotations

import fnmatch
import re
from dataclasses import dataclass

from pydantic import field_validator
from torch import nn

from ..config import Config
from ..errors import ConfigError

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
LEVELS = 4


class GroupSpec(Config):
    name: str
    level: int
    patterns: list[str]
    per_layer: bool = False

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", v):
            raise ValueError(f"group name {v!r} must be letters, digits, '_' or '-' (it names MLflow metrics)")
        return v

    @field_validator("level")
    @classmethod
    def _level(cls, v: int) -> int:
        if not 0 <= v < LEVELS:
            raise ValueError(f"level must be 0..{LEVELS - 1} (L0 coarsest, trained first); got {v}")
        return v

    @field_validator("patterns")
    @classmethod
    def _patterns(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("patterns must list at least one glob over parameter names")
        return v


@dataclass(frozen=True)
class Group:
    name: str
    level: int
    params: tuple[str, ...]  # parameter names, model order


def partition(model: nn.Module, specs: list[GroupSpec], *, where: str = "groups") -> list[Group]:
    """The groups of `model`'s parameters (a tied weight once, under its first name), in
    spec order (per-layer groups by layer). `where` prefixes error messages."""
    if not specs:
        raise ConfigError(f"{where}: no groups; list at least one (name, level, patterns)")
    names = [s.name for s in specs]
    if dup := sorted({n for n in names if names.count(n) > 1}):
        raise ConfigError(f"{where}: group names must be unique; repeated: {', '.join(dup)}")
    params = [name for name, _ in model.named_parameters()]
    hits: dict[tuple[int, int], int] = {}  # (spec, pattern) -> tensors matched
    owner: dict[str, int] = {}
    for name in params:
        matched = [i for i, s in enumerate(specs) if any(fnmatch.fnmatchcase(name, p) for p in s.patterns)]
        for i in matched:
            for j, p in enumerate(specs[i].patterns):
                if fnmatch.fnmatchcase(name, p):
                    hits[(i, j)] = hits.get((i, j), 0) + 1
        if not matched:
            raise ConfigError(f"{where}: parameter '{name}' is in no group; add a pattern that matches it "
                              f"(groups: {', '.join(names)})")
        if len(matched) > 1:
            raise ConfigError(f"{where}: parameter '{name}' is in {len(matched)} groups "
                              f"({', '.join(specs[i].name for i in matched)}); groups must not overlap: "
                              "narrow their patterns")
        owner[name] = matched[0]
    for i, s in enumerate(specs):
        for j, p in enumerate(s.patterns):
            if not hits.get((i, j)):
                raise ConfigError(f"{where}[{i}] ({s.name}): pattern {p!r} matches no parameter; fix or remove it "
                                  f"(parameters look like '{params[0]}', 'model.layers.0.mlp.up_proj.weight')")
    groups: list[Group] = []
    for i, s in enumerate(specs):
        mine = [n for n in params if owner[n] == i]
        if not s.per_layer:
            groups.append(Group(s.name, s.level, tuple(mine)))
            continue
        by_layer: dict[int, list[str]] = {}
        for n in mine:
            m = LAYER.search(n)
            if m is None:
                raise ConfigError(f"{where}[{i}] ({s.name}): per_layer is set but parameter '{n}' is in no "
                                  "block (model.layers.<i>.); move it to a group without per_layer")
            by_layer.setdefault(int(m.group(1)), []).append(n)
        groups.extend(Group(f"{s.name}.{k}", s.level, tuple(v)) for k, v in sorted(by_layer.items()))
    return groups
