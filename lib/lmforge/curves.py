"""A run's step metrics as plot files: the `curves/` output that `dvc plots` and the report read.

    journal = Curves(scratch / "curves.jsonl")   # survives a killed run, like its checkpoints
    journal.add({"train/loss": 3.2, "eval/val_loss": 3.4}, step=10)
    journal.write(out_dir / "curves")            # curves/train.csv, curves/eval.csv

A metric `a/b/name` lands in `a_b.csv`, column `name` (one row per step, sorted; a step that did
not log a column leaves its cell empty); a metric with no `/` lands in `metrics.csv`.

Why a journal: a killed training stage resumes from its last checkpoint and re-logs only the
steps after it. The journal keeps the steps logged before the kill, and the resumed run logs the
same values again for the steps it repeats (training is deterministic), so the last value per
(step, metric) gives the curve of an uninterrupted run, byte for byte.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .tracking import numeric

DEFAULT_GROUP = "metrics"


def group_of(key: str) -> tuple[str, str]:
    """'ungoverned/train/loss' -> ('ungoverned_train', 'loss'); 'loss' -> ('metrics', 'loss')."""
    head, sep, name = key.rpartition("/")
    return (head.replace("/", "_") if sep else DEFAULT_GROUP), name


class Curves:
    def __init__(self, journal: Path):
        self.journal = Path(journal)
        self.values: dict[tuple[int, str], float] = {}
        if self.journal.exists():
            self._replay()

    def _replay(self) -> None:
        data = self.journal.read_bytes()
        good = 0  # bytes up to the end of the last complete line
        for line in data.split(b"\n")[:-1] if data.endswith(b"\n") else data.split(b"\n"):
            end = good + len(line) + 1
            try:
                entry = json.loads(line) if line else None
            except json.JSONDecodeError:
                if end >= len(data):  # the last line of a killed run may be torn: it is logged again
                    break
                raise ValueError(f"{self.journal}: byte {good}: a broken line before the end; delete the "
                                 "file to start the curves over (the run re-logs them)") from None
            if entry is not None:
                self._merge(entry["metrics"], entry["step"])
            good = end
        if good < len(data):  # cut the torn tail so that new lines do not run into it
            with self.journal.open("r+b") as fh:
                fh.truncate(good)

    def _merge(self, metrics: Mapping[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.values[(step, key)] = value

    def add(self, metrics: Mapping[str, Any], step: int) -> None:
        values = {k: v for k, v in numeric(metrics).items() if math.isfinite(v)}
        if not values:
            return
        self._merge(values, step)
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with self.journal.open("ab") as fh:
            fh.write(json.dumps({"step": step, "metrics": values}, sort_keys=True).encode() + b"\n")

    def tables(self) -> dict[str, str]:
        """{'train.csv': csv text, ...}: what `write` writes."""
        groups: dict[str, dict[int, dict[str, float]]] = {}
        for (step, key), value in self.values.items():
            group, name = group_of(key)
            groups.setdefault(group, {}).setdefault(step, {})[name] = value
        out = {}
        for group, rows in sorted(groups.items()):
            columns = sorted({c for row in rows.values() for c in row})
            buf = io.StringIO()
            writer = csv.writer(buf, lineterminator="\n")
            writer.writerow(["step", *columns])
            for step in sorted(rows):
                writer.writerow([step, *(repr(rows[step][c]) if c in rows[step] else "" for c in columns)])
            out[f"{group}.csv"] = buf.getvalue()
        return out

    def write(self, out_dir: Path) -> None:
        """Write the tables into `out_dir` (a staging directory; the caller publishes it)."""
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, text in self.tables().items():
            (out_dir / name).write_text(text)


def read_table(path: Path) -> dict[str, list[tuple[int, float]]]:
    """A curves CSV back as {column: [(step, value), ...]} (empty cells skipped)."""
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    out: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        step = int(row.pop("step"))
        for column, cell in row.items():
            if cell:
                out.setdefault(column, []).append((step, float(cell)))
    return out
