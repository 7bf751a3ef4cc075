"""`lmforge forge add|list|ask|remove` on a small model: a delta is forged, listed, asked,
removed; bad input and a failed gate leave the registry as it was."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from lmforge.cli import main
from tests.forge.helpers import REAL

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def params(tmp_path: Path) -> Path:
    forge = yaml.safe_load((ROOT / "params.yaml").read_text())["forge"]
    forge["facts"] |= {"real": str(REAL), "unrelated": 20}
    forge["train"] |= {"steps": 80, "micro_batch": 8, "global_batch": 8, "progress": False}
    forge["train"]["optim"]["matrix_lr"] = 0.02
    forge["delta"] |= {"rank": 8, "alpha": 16.0}
    forge["gate"] = {"efficacy": 0.9, "paraphrase": 0.0, "locality": 0.95}  # a random base cannot paraphrase
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"forge": forge}))
    return path


def _facts(tmp_path: Path, recs: list[dict[str, str]]) -> Path:
    path = tmp_path / "new.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


def _snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_add_list_ask_remove(tmp_path: Path, model_dir: Path, params: Path, capsys: pytest.CaptureFixture) -> None:
    reg = tmp_path / "registry"
    recs = [{"subject": "Quorbish", "relation": "occupation", "object": "baker"},
            {"subject": "Treimalon", "relation": "instrument", "object": "harp"}]
    common = ["--registry", str(reg), "--model", str(model_dir), "--params", str(params)]
    assert main(["forge", "add", *common, "--facts", str(_facts(tmp_path, recs)), "--category", "people"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["accepted"] and row["efficacy"] == 1.0 and row["locality"] >= 0.95
    assert main(["forge", "list", "--registry", str(reg)]) == 0
    listing = capsys.readouterr().out
    assert row["id"] in listing and "people" in listing
    assert main(["forge", "ask", *common, "--prompt", "Quorbish works as a", "--max-new-tokens", "3"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.err.strip().splitlines()[-1])["active"] == [row["id"]]
    assert out.out.startswith("Quorbish works as a baker")
    assert main(["forge", "ask", *common, "--prompt", "The capital of France is"]) == 0
    assert json.loads(capsys.readouterr().err.strip().splitlines()[-1])["active"] == []
    assert main(["forge", "remove", "--registry", str(reg), row["id"]]) == 0
    assert main(["forge", "list", "--registry", str(reg), "--json"]) == 0
    assert json.loads(capsys.readouterr().out.split("\n", 1)[1]) == []


def test_bad_facts_and_failed_gate_leave_the_registry_unchanged(tmp_path: Path, model_dir: Path, params: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    reg = tmp_path / "registry"
    common = ["--registry", str(reg), "--model", str(model_dir), "--params", str(params)]
    ok = _facts(tmp_path, [{"subject": "Quorbish", "relation": "occupation", "object": "baker"}])
    assert main(["forge", "add", *common, "--facts", str(ok)]) == 0
    before = _snapshot(reg)
    bad = _facts(tmp_path, [{"subject": "Zed", "relation": "occupation", "object": ""}])
    assert main(["forge", "add", *common, "--facts", str(bad)]) == 2
    assert "new.jsonl:1: field 'object' is empty" in capsys.readouterr().err
    strict = yaml.safe_load(params.read_text())
    strict["forge"]["train"]["steps"] = 2  # too short to learn: efficacy fails the gate
    (tmp_path / "strict.yaml").write_text(yaml.safe_dump(strict))
    other = _facts(tmp_path, [{"subject": "Velmorix", "relation": "colour", "object": "green"}])
    code = main(["forge", "add", "--registry", str(reg), "--model", str(model_dir), "--params",
                 str(tmp_path / "strict.yaml"), "--facts", str(other)])
    assert code == 3 and "efficacy 0.000 < 0.9" in capsys.readouterr().err
    assert _snapshot(reg) == before
