"""The stage wrapper through real stage processes: bad input fails cleanly and tears nothing.

Each bad input must give a non-zero exit and a message naming the file and line (or the
params key), leave the previous outputs byte-identical, leave no staging directory behind,
and add nothing to the audit chain.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from lmforge.digest import sha256_path
from tests.pipeline_repo import copy_repo, run

ROOT = Path(__file__).resolve().parent.parent
OUTS = ["data/mix/train", "data/mix/val", "data/mix/dropped.parquet", "data/mix/metrics.json"]


def _set_sources(repo: Path, sources: list[dict], **extra: object) -> None:
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["mix"]["sources"] = sources
    params["mix"]["mixing"]["total"] = None
    params["mix"].update(extra)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def _source(path: str) -> dict:
    return {"name": "s", "path": path, "share": 1.0, "licence": "test"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = copy_repo(tmp_path_factory.mktemp("wrapper") / "repo", profile=None)
    good = r / "data/sources/good.jsonl.gz"
    good.write_bytes((ROOT / "tests/fixtures/sources/shakespeare.jsonl.gz").read_bytes())
    _set_sources(r, [_source("data/sources/good.jsonl.gz")])
    run(r, "python", "-m", "stages.mix")
    return r


def _snapshot(repo: Path) -> dict[str, str]:
    return {o: sha256_path(repo / o) for o in OUTS} | {"audit": sha256_path(repo / "audit/log.jsonl")}


def test_good_run_wrote_declared_outputs_and_one_audit_record(repo: Path) -> None:
    for o in OUTS:
        assert (repo / o).exists(), o
    lines = (repo / "audit/log.jsonl").read_text().splitlines()
    rec = json.loads(lines[-1])
    assert len(lines) == 2 and rec["stage"] == "mix" and rec["runner"] == "dvc"
    assert set(rec["outputs"]) == set(OUTS)
    assert rec["outputs"]["data/mix/train"] == sha256_path(repo / "data/mix/train")


BAD = {
    "malformed": (b'{"text": "fine text here"}\n{"text": "unterminated\n', 2, "malformed JSON"),
    "missing_text": (b'{"text": "fine text here"}\n{"body": "x"}\n', 2, "missing field 'text'"),
    "non_string_text": (b'{"text": "fine text here"}\n{"text": ["x"]}\n', 2, "must be a string"),
    "non_utf8": (b'{"text": "fine text here"}\n{"text": "\xff\xfe"}\n', 2, "not UTF-8"),
    "empty": (b"", None, "no documents"),
}


@pytest.mark.parametrize("kind", list(BAD))
def test_bad_source_fails_cleanly(repo: Path, kind: str) -> None:
    content, line, needle = BAD[kind]
    bad = repo / f"data/sources/bad_{kind}.jsonl.gz"
    bad.write_bytes(gzip.compress(content, mtime=0))
    before = _snapshot(repo)
    params_before = (repo / "params.yaml").read_text()
    try:
        _set_sources(repo, [_source("data/sources/good.jsonl.gz") | {"share": 0.5},
                            _source(f"data/sources/{bad.name}") | {"name": "b", "share": 0.5}])
        proc = run(repo, "python", "-m", "stages.mix", check=False)
    finally:
        (repo / "params.yaml").write_text(params_before)
    assert proc.returncode == 2, proc.stderr
    where = f"{bad.name}:{line}" if line else bad.name
    assert where in proc.stderr and needle in proc.stderr, proc.stderr
    assert _snapshot(repo) == before
    assert not list((repo / "data").glob(".mix.*"))  # no staging dir or half swap left


def _mix_with_params(repo: Path, edit: Callable[[dict[str, Any]], None]) -> str:
    """Run the mix stage with params.yaml edited by `edit` (put back afterwards); it must fail
    with exit code 2 before touching anything. Returns its stderr."""
    before = _snapshot(repo)
    params_before = (repo / "params.yaml").read_text()
    try:
        params = yaml.safe_load(params_before)
        edit(params)
        (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        proc = run(repo, "python", "-m", "stages.mix", check=False)
    finally:
        (repo / "params.yaml").write_text(params_before)
    assert proc.returncode == 2, proc.stderr
    assert _snapshot(repo) == before
    return proc.stderr


def test_unknown_params_key_fails_before_any_work(repo: Path) -> None:
    err = _mix_with_params(repo, lambda p: p["mix"]["filters"].update(min_chars_typo=5))
    assert "mix.filters.min_chars_typo: unknown key" in err
    assert "min_chars" in err  # the allowed keys are listed


def test_a_missing_params_section_names_the_fix_before_any_work(repo: Path) -> None:
    err = _mix_with_params(repo, lambda p: p.pop("mix"))
    assert "lmforge mix: error: params.yaml: section 'mix' is missing (fix: add a 'mix:' block)" in err


def test_a_source_outside_the_declared_deps_is_refused(repo: Path) -> None:
    before = _snapshot(repo)
    params_before = (repo / "params.yaml").read_text()
    (repo / "stray.jsonl").write_text('{"text": "a perfectly fine document"}\n')
    try:
        _set_sources(repo, [_source("stray.jsonl")])
        proc = run(repo, "python", "-m", "stages.mix", check=False)
    finally:
        (repo / "params.yaml").write_text(params_before)
    assert proc.returncode == 2
    assert "reads stray.jsonl, which is not under any dependency of stage 'mix'" in proc.stderr
    assert _snapshot(repo) == before


def test_missing_upstream_input_names_the_stage_to_run(repo: Path, tmp_path: Path) -> None:
    fresh = copy_repo(tmp_path / "fresh", profile=None)
    proc = run(fresh, "python", "-m", "stages.tokenizer", check=False)
    assert proc.returncode == 2
    assert "data/mix/train" in proc.stderr and "dvc repro mix" in proc.stderr


def test_data_parallel_processes_come_from_meta_gpus_or_the_workers_override(monkeypatch: pytest.MonkeyPatch) -> None:
    """meta.gpus picks the process count; LMFORGE_GPUS overrides it on a worker; a stage that
    does not train data-parallel refuses meta.gpus > 1; a CUDA host with too few GPUs says so."""
    import torch

    from lmforge.errors import ConfigError
    from stages import dag
    from stages.wrapper import GPUS_ENV, processes

    def spec(gpus: int) -> dag.StageSpec:
        return dag.StageSpec("pretrain", "", (), (), (), (), (), "gpu", gpus)

    monkeypatch.delenv(GPUS_ENV, raising=False)
    assert [processes("pretrain", spec(g), True) for g in (0, 1, 2, 8)] == [1, 1, 2, 8]
    assert processes("pretrain", None, True) == 1
    with pytest.raises(ConfigError, match=r"stages.mix.meta.gpus: 2: stage 'mix' does not train data-parallel"):
        processes("mix", spec(2), False)
    monkeypatch.setenv(GPUS_ENV, "4")
    assert processes("pretrain", spec(8), True) == 4 and processes("mix", spec(1), False) == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(GPUS_ENV, bad)
        with pytest.raises(ConfigError, match=f"{GPUS_ENV}={bad}: give a whole number"):
            processes("pretrain", spec(1), True)
    monkeypatch.delenv(GPUS_ENV)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1")
    assert processes("pretrain", spec(2), True) == 2
    with pytest.raises(ConfigError, match=r"asks for 8 GPUs but this machine sees 2 \(CUDA_VISIBLE_DEVICES=0,1\)"):
        processes("pretrain", spec(8), True)
