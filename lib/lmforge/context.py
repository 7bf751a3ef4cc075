"""What a stage's library `run` may ask of its caller: `run(cfg, inputs, out_dir, ctx=...)`.

- `ctx.log_metrics(metrics, step)`: metrics by step (loss curves); buffered and sent in batches.
- `ctx.timings`: wall-clock figures (seconds) for the tracking run; never in metrics.json,
  which must be deterministic.
- `ctx.decisions`: records of decisions the run made (e.g. a governor's state changes), each a
  dict with a `kind`; the caller appends them to the audit chain, in order, when the run has
  succeeded, just before the stage's own record.
- `ctx.scratch`: a directory for resumable state (checkpoints) that lives outside the DVC
  outputs and survives a killed run; the caller empties it after a successful run.
- `ctx.audit`: the audit chain as the stage found it ({chain_id, count, head_hash, verified}),
  or None when there is no chain yet (what the export's model card cites).
- `ctx.audit_log`: the chain's file, to read (the report's lineage); None outside a pipeline.

A library function asks for `ctx` by naming it as a parameter; without it, it gets nothing.
`RunContext()` with no arguments is a working context for tests and notebooks.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

MetricsSink = Callable[[Mapping[str, Any], int], None]


class RunContext:
    def __init__(self, scratch: Path | None = None, sink: MetricsSink | None = None,
                 audit: Mapping[str, Any] | None = None, audit_log: Path | None = None):
        self.audit = dict(audit) if audit is not None else None
        self.audit_log = Path(audit_log) if audit_log is not None else None
        self.scratch = Path(scratch) if scratch is not None else Path(tempfile.mkdtemp(prefix="lmforge-scratch-"))
        self.scratch.mkdir(parents=True, exist_ok=True)
        self.timings: dict[str, float] = {}
        self.decisions: list[dict[str, Any]] = []
        self._sink = sink

    def log_metrics(self, metrics: Mapping[str, Any], step: int) -> None:
        if self._sink is not None:
            self._sink(metrics, step)
