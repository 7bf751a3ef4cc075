"""Errors a user can act on: each names the thing that is wrong and how to fix it."""

from __future__ import annotations

from pathlib import Path


class LmforgeError(Exception):
    """Base class: the CLI prints these as one clean message and exits non-zero."""

    exit_code = 2


class ConfigError(LmforgeError):
    """A params key is unknown, missing or of the wrong type."""


class InputError(LmforgeError):
    """An input file is malformed; the message names the file and, where known, the line."""

    def __init__(self, path: str | Path, problem: str, *, line: int | None = None, fix: str = ""):
        self.path = str(path)
        self.line = line
        self.problem = problem
        self.fix = fix
        where = f"{self.path}:{line}" if line is not None else self.path
        msg = f"{where}: {problem}"
        if fix:
            msg += f" (fix: {fix})"
        super().__init__(msg)


class AuditError(LmforgeError):
    """The audit chain is broken or cannot be appended to."""


class Refused(LmforgeError):
    """A policy refused the run's result (e.g. the forgetting gate). The stage wrapper still
    appends the run's decision records to the audit chain before it fails."""

    exit_code = 3
