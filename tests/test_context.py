"""RunContext: what a library run may ask of its caller."""

from __future__ import annotations

from pathlib import Path

from lmforge.context import RunContext


def test_defaults_work_without_a_tracking_run() -> None:
    ctx = RunContext()
    assert ctx.scratch.is_dir()
    ctx.log_metrics({"loss": 1.0}, step=0)  # no sink: accepted, goes nowhere
    ctx.timings["x_s"] = 1.5


def test_sink_receives_step_metrics(tmp_path: Path) -> None:
    got: list[tuple[dict, int]] = []
    ctx = RunContext(scratch=tmp_path / "s", sink=lambda m, step: got.append((dict(m), step)))
    ctx.log_metrics({"loss": 2.0}, 3)
    assert got == [({"loss": 2.0}, 3)] and (tmp_path / "s").is_dir()
