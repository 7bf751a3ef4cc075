"""lmforge.curves: step metrics to CSV, and a killed run's journal resumed to the same bytes."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.curves import Curves, group_of, read_table


def test_groups_by_prefix() -> None:
    assert group_of("train/loss") == ("train", "loss")
    assert group_of("ungoverned/eval/val_loss") == ("ungoverned_eval", "val_loss")
    assert group_of("loss") == ("metrics", "loss")


def test_tables_sorted_with_empty_cells_and_exact_values(tmp_path: Path) -> None:
    c = Curves(tmp_path / "j.jsonl")
    c.add({"train/loss": 2.5, "eval/val_loss": 0.1 + 0.2}, step=10)
    c.add({"train/loss": 3.0, "train/lr": 1.0, "note": "text is not a curve"}, step=2)
    c.add({"train/loss": float("nan")}, step=11)  # not finite: not plotted
    tables = c.tables()
    assert tables["train.csv"] == "step,loss,lr\n2,3.0,1.0\n10,2.5,\n"
    assert tables["eval.csv"] == "step,val_loss\n10,0.30000000000000004\n"
    c.write(tmp_path / "out")
    assert read_table(tmp_path / "out" / "train.csv") == {"loss": [(2, 3.0), (10, 2.5)], "lr": [(2, 1.0)]}


def test_a_resumed_run_writes_the_same_tables_as_an_uninterrupted_one(tmp_path: Path) -> None:
    whole = Curves(tmp_path / "whole.jsonl")
    for step in range(10):
        whole.add({"train/loss": 1.0 / (step + 1)}, step)
    # killed after step 6 (mid-write of step 7), resumed from a checkpoint at step 4
    killed = Curves(tmp_path / "killed.jsonl")
    for step in range(7):
        killed.add({"train/loss": 1.0 / (step + 1)}, step)
    with (tmp_path / "killed.jsonl").open("ab") as fh:
        fh.write(b'{"metrics": {"train/lo')
    resumed = Curves(tmp_path / "killed.jsonl")
    for step in range(5, 8):
        resumed.add({"train/loss": 1.0 / (step + 1)}, step)
    again = Curves(tmp_path / "killed.jsonl")  # killed again, resumed again
    for step in range(7, 10):
        again.add({"train/loss": 1.0 / (step + 1)}, step)
    assert again.tables() == whole.tables()


def test_a_torn_line_before_the_end_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "j.jsonl").write_bytes(b'{"metrics": {"a": 1}, "step": 0}\n{"met\n{"metrics": {"a": 2}, "step": 1}\n')
    with pytest.raises(ValueError):
        Curves(tmp_path / "j.jsonl")
