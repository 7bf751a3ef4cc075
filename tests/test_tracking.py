"""MLflow parent runs under plain `dvc repro`: one per pipeline run, never a driver's own."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge import tracking


@pytest.fixture
def exp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    # set through monkeypatch so it is undone after the test (mlflow.set_tracking_uri exports it too)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    return tracking.configure(tmp_path)


def _child(exp: str, parent: str, stage: str) -> None:
    with tracking.child_run(exp, parent, stage, {}):
        pass


def test_stages_of_one_run_share_a_parent_and_a_rerun_gets_a_new_one(exp: str) -> None:
    p1 = tracking.find_or_create_parent(exp, "k", "mix")
    _child(exp, p1, "mix")
    assert tracking.find_or_create_parent(exp, "k", "tokenizer") == p1  # same run, next stage
    _child(exp, p1, "tokenizer")
    p2 = tracking.find_or_create_parent(exp, "k", "mix")  # mix again: a new pipeline run
    assert p2 != p1
    assert tracking.find_or_create_parent(exp, "other-key", "tokenizer") not in (p1, p2)


def test_a_prefect_parent_is_never_joined_by_dvc_stages(exp: str) -> None:
    flow_parent = tracking.create_parent(exp, "k", driver="prefect")
    assert tracking.find_or_create_parent(exp, "k", "mix") != flow_parent


def test_audit_anchor_is_per_chain_and_reads_without_creating(
    exp: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = tracking.create_parent(exp, "k", driver="dvc")
    tracking.set_tags(run, {"audit.chain_id": "A", "audit.count": "3", "audit.head_hash": "h3"})
    other = tracking.create_parent(exp, "k2", driver="dvc")
    tracking.set_tags(other, {"audit.chain_id": "B", "audit.count": "9", "audit.head_hash": "h9"})
    assert tracking.latest_audit_anchor(tmp_path, "A") == (3, "h3")
    assert tracking.latest_audit_anchor(tmp_path, "C") is None
    monkeypatch.delenv("MLFLOW_TRACKING_URI")  # now the default store: <root>/mlflow.db
    assert tracking.latest_audit_anchor(tmp_path, "A") == (3, "h3")
    empty = tmp_path / "elsewhere"
    empty.mkdir()
    assert tracking.latest_audit_anchor(empty, "A") is None
    assert not (empty / "mlflow.db").exists()
