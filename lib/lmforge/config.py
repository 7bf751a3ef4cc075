"""Typed, frozen, validated configs.

Every stage has one config class (a `StageConfig`) whose fields are its `params.yaml`
section. Loading fails before any work on an unknown, missing or mistyped key, naming the
key, what was given and what is allowed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, ValidationError

from . import inputs
from .digest import sha256_json
from .errors import ConfigError

C = TypeVar("C", bound="Config")


class Config(BaseModel):
    """Base for every config block: frozen, no extra keys, no silent type coercion."""

    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, validate_default=True)

    def digest(self) -> str:
        return sha256_json(self.model_dump(mode="json"))


class StageConfig(Config):
    """Base for a stage's section of params.yaml."""


def non_empty(what: str) -> AfterValidator:
    """For `Annotated[list[X], non_empty("X")]`: an empty list is an error saying what to list."""
    def check(v: list[Any]) -> list[Any]:
        if not v:
            raise ValueError(f"list at least one {what}")
        return v
    return AfterValidator(check)


def _loc(prefix: str, loc: tuple[Any, ...]) -> str:
    out = prefix
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def _allowed(cls: type[BaseModel], loc: tuple[Any, ...]) -> list[str]:
    """The field names allowed at `loc` (best effort: follows nested models and lists)."""
    model: Any = cls
    for part in loc:
        if isinstance(part, int):
            continue
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            return []
        field = model.model_fields.get(part)
        if field is None:
            break
        model = field.annotation
        for _ in range(3):  # unwrap list[X] / X | None / tuple[X, ...]
            args = getattr(model, "__args__", None)
            if not args:
                break
            model = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), args[0])
    if isinstance(model, type) and issubclass(model, BaseModel):
        return sorted(model.model_fields)
    return []


def validation_lines(err: ValidationError, cls: type[BaseModel], where: str, fixes: bool = False) -> list[str]:
    """One line per problem, each naming the key path under `where` and what is allowed; with
    `fixes`, each also says what to change (callers that know a better fix add their own)."""
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = _loc(where, loc)
        if e["type"] == "extra_forbidden":
            allowed = _allowed(cls, loc[:-1])
            fix = " (fix: correct the key's spelling, or remove it)" if fixes else ""
            lines.append(f"{key}: unknown key; allowed keys here: {', '.join(allowed)}{fix}")
        elif e["type"] == "missing":
            lines.append(f"{key}: required key is missing (fix: add '{loc[-1]}:')")
        elif e["type"] == "value_error":  # our own validators: the message names the value already
            lines.append(f"{key}: {e['msg'].removeprefix('Value error, ')}")
        else:
            fix = f" (fix: give '{loc[-1]}' a value of that kind)" if fixes else ""
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r}){fix}")
    return lines


def format_validation_error(err: ValidationError, cls: type[BaseModel], where: str) -> str:
    return "invalid params:\n  " + "\n  ".join(validation_lines(err, cls, where, fixes=True))


def build(cls: type[C], data: Any, where: str) -> C:
    """Validate `data` into `cls`; `where` prefixes the key paths in errors (e.g. 'params.yaml: mix')."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: expected a mapping of keys, got {type(data).__name__} "
                          "(fix: write the section as indented 'key: value' lines)")
    try:
        return cls.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, cls, where)) from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping, read as YAML 1.2 like DVC reads params.yaml (ruamel), so `3e-4` is a float
    and `on` a string here too, not YAML 1.1's string and boolean. Over `inputs.MAX_YAML_BYTES`,
    not UTF-8 or not YAML is a ConfigError naming the file and line."""
    from ruamel.yaml import YAML
    from ruamel.yaml.error import YAMLError

    path = Path(path)
    try:
        size = path.stat().st_size
        if size > inputs.MAX_YAML_BYTES:  # hand-written settings: anything this big is the wrong file
            raise ConfigError(f"{path}: is {inputs.size_text(size)}, over the {inputs.size_text(inputs.MAX_YAML_BYTES)} "
                              "limit for a YAML file (fix: point at the params file, not a data file)")
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found (fix: run from the repository root, or check the path)") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ConfigError(f"{path}:{line}: not UTF-8 text ({e.reason} at byte {e.start}) "
                          "(fix: re-encode the file as UTF-8)") from None
    try:
        data = YAML(typ="safe", pure=True).load(text)
    except YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML: {getattr(e, 'problem', None) or e} "
                          "(fix: correct the YAML at that line: indentation, a missing ':' or an unclosed "
                          "bracket or quote)") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__} "
                          "(fix: write 'section:' blocks, e.g. 'mix:')")
    return data


def load_section(path: str | Path, section: str, cls: type[C]) -> C:
    """Load `section` of the YAML file at `path` into `cls`."""
    data = read_yaml(path)
    if section not in data:
        raise ConfigError(f"{path}: section '{section}' is missing (fix: add a '{section}:' block)")
    return build(cls, data[section], f"{Path(path).name}: {section}")
