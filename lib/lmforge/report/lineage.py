"""Which audited run made the outputs in front of us: the report's lineage, from the audit chain.

    runs = audited_runs(AuditLog(path).records(), {"pretrain": {"data/pretrain/metrics.json": "ab12.."}})
    runs["pretrain"].inputs      # {dep path: sha256} as the stage recorded them

For each stage, the last `stage` record (or `stage.remote`, for a stage a GPU worker ran) whose
output digests agree with the digests of that stage's outputs as the report reads them now. A
stage with no such record ran outside this chain (or its outputs were changed since): the report
says so rather than guessing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

STAGE_KINDS = ("stage", "stage.remote")


@dataclass(frozen=True)
class StageRun:
    stage: str
    record: Mapping[str, Any]

    @property
    def inputs(self) -> dict[str, str]:
        return dict(self.record.get("inputs") or {})

    @property
    def outputs(self) -> dict[str, str]:
        return dict(self.record.get("outputs") or {})

    @property
    def remote(self) -> bool:
        return self.record.get("kind") == "stage.remote"

    @property
    def wall_s(self) -> float | None:
        """Seconds from start to finish, as the stage recorded them (a worker's, for a remote one)."""
        rec = self.record.get("worker_record") if self.remote else self.record
        if not isinstance(rec, Mapping) or not rec.get("started") or not rec.get("finished"):
            return None
        try:
            return (datetime.fromisoformat(rec["finished"]) - datetime.fromisoformat(rec["started"])).total_seconds()
        except (TypeError, ValueError):
            return None


def audited_runs(records: Iterable[Mapping[str, Any]],
                 outputs_now: Mapping[str, Mapping[str, str]]) -> dict[str, StageRun | None]:
    """{stage: the last record whose outputs match `outputs_now[stage]`, or None}."""
    found: dict[str, StageRun | None] = dict.fromkeys(outputs_now)
    for rec in records:
        stage = rec.get("stage")
        if rec.get("kind") not in STAGE_KINDS or stage not in outputs_now:
            continue
        recorded = rec.get("outputs") or {}
        now = outputs_now[stage]
        if now and all(recorded.get(path) == digest for path, digest in now.items()):
            found[stage] = StageRun(stage, rec)
    return found
