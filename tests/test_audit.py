"""The audit chain: every tamper case is caught, crashes are told apart and recovered, the CLI
reports the first bad record, and concurrent appends from 8 processes leave a valid chain."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

import pytest

from lmforge import audit, cli
from lmforge.audit import ZERO_HASH, AuditLog, Head, build_stage_record, utc_now
from lmforge.digest import canonical_json, sha256_json
from lmforge.errors import AuditError
from lmforge.inputs import MAX_AUDIT_LINE_BYTES

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    **os.environ,
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "lib"), os.environ.get("PYTHONPATH")) if p),
}


def stage_body(i: int, stage: str = "pretrain") -> dict[str, Any]:
    return build_stage_record(
        stage=stage,
        inputs={"data/tokenizer": sha256_json(["in", i])},
        outputs={"data/pretrain": sha256_json(["out", i])},
        params_digest=sha256_json({"lr": i}),
        code={"commit": "c0ffee" + "0" * 34, "dirty": i % 2 == 1},
        environment={"python": "3.11.9", "torch": "2.4.0", "device": "cpu"},
        runner="cpu",
        mlflow_run_id=f"run{i}",
        started=utc_now(),
        finished=utc_now(),
        extra={"step": i},
    )


@pytest.fixture
def log(tmp_path: Path) -> AuditLog:
    """Genesis + 5 stage records (seq 0..5), anchored."""
    log = AuditLog(tmp_path / "audit" / "log.jsonl")
    for i in range(5):
        log.append(stage_body(i))
    return log


def lines(log: AuditLog) -> list[bytes]:
    return log.path.read_bytes().splitlines(keepends=True)


def write_lines(log: AuditLog, new: list[bytes]) -> None:
    log.path.write_bytes(b"".join(new))


def resealed(line: bytes, **changes: Any) -> bytes:
    """Edit a record and recompute its own hash, as a careful forger would."""
    rec = {k: v for k, v in json.loads(line).items() if k != "hash"}
    rec.update(changes)
    rec["hash"] = sha256_json(rec)
    return (canonical_json(rec) + "\n").encode()


def assert_broken(log: AuditLog, seq: int | None, phrase: str, **anchor: Any) -> audit.VerifyReport:
    report = log.verify(**anchor)
    assert not report.ok
    assert report.first_bad_seq == seq, report.problem
    assert report.line == (None if seq is None else seq + 1)
    assert phrase in report.problem, report.problem
    assert "(fix: " in report.problem, report.problem  # every problem says what to do
    return report


class Crash(Exception):
    """Stands in for the process dying between writing the log line and committing the head."""


@pytest.fixture
def crash_before_commit(monkeypatch: pytest.MonkeyPatch):
    real = AuditLog._write_head

    def write_head(self: AuditLog, head: Head) -> None:
        if head.pending is None:  # the commit, not the announcement
            raise Crash
        real(self, head)

    monkeypatch.setattr(AuditLog, "_write_head", write_head)
    yield
    monkeypatch.setattr(AuditLog, "_write_head", real)


# ---- an intact chain ---------------------------------------------------------------------
def test_fresh_chain_links_and_verifies(log: AuditLog) -> None:
    recs = list(log.records())
    assert [r["seq"] for r in recs] == list(range(6))
    assert (
        recs[0]["kind"] == "genesis" and recs[0]["prev_hash"] == ZERO_HASH and len(recs[0]["chain_id"]) == 32
    )
    for prev, rec in zip(recs, recs[1:], strict=False):
        assert rec["prev_hash"] == prev["hash"]
        assert rec["hash"] == sha256_json({k: v for k, v in rec.items() if k != "hash"})
    assert recs[3]["stage"] == "pretrain" and recs[3]["mlflow_run_id"] == "run2"
    report = log.verify()
    assert report.ok and report.count == 6 and report.head_hash == recs[-1]["hash"]
    assert log.head() == Head(6, recs[-1]["hash"], None, log.head().updated)
    assert json.loads(log.head_path.read_text())["count"] == 6


def test_append_returns_what_is_stored_and_reads_long_tails(log: AuditLog) -> None:
    rec = log.append({"kind": "note", "blob": "x" * 200_000, "pair": (1, 2)})  # tail spans several blocks
    assert rec["pair"] == [1, 2] and rec["seq"] == 6 and rec["kind"] == "note"
    assert list(log.records())[-1] == rec
    assert log.append(stage_body(9))["prev_hash"] == rec["hash"]
    assert log.verify().ok


# ---- tampering ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("old", "new", "phrase"),
    [
        (b'"stage":"pretrain"', b'"stage":"pretrajn"', "stored hash does not match"),
        (b'"dirty":true', b'"dirty":false', "stored hash does not match"),
        (b',"kind":', b', "kind":', "canonical form"),
        (b'"kind":"stage"', b'"kind":"stag\\u0065"', "canonical form"),
    ],
)
def test_a_changed_byte_is_caught(log: AuditLog, old: bytes, new: bytes, phrase: str) -> None:
    ls = lines(log)
    assert old in ls[2]
    ls[2] = ls[2].replace(old, new, 1)
    write_lines(log, ls)
    assert_broken(log, 2, phrase)


def test_a_changed_hash_digit_is_caught(log: AuditLog) -> None:
    ls = lines(log)
    h = json.loads(ls[4])["hash"]
    ls[4] = ls[4].replace(h.encode(), (("1" if h[0] != "1" else "2") + h[1:]).encode())
    write_lines(log, ls)
    assert_broken(log, 4, "stored hash does not match")


def test_a_deleted_record_is_caught(log: AuditLog) -> None:
    ls = lines(log)
    del ls[2]
    write_lines(log, ls)
    assert_broken(log, 2, "seq is 3 where 2 was expected")


def test_reordered_records_are_caught(log: AuditLog) -> None:
    ls = lines(log)
    ls[2], ls[3] = ls[3], ls[2]
    write_lines(log, ls)
    assert_broken(log, 2, "deleted, inserted or reordered")


def test_a_forged_appended_record_is_caught_and_blocks_appends(log: AuditLog) -> None:
    last = json.loads(lines(log)[-1])
    forged = {"seq": 6, "kind": "stage", "prev_hash": last["hash"], "ts": utc_now(), "stage": "forged"}
    forged["hash"] = sha256_json(forged)
    with log.path.open("ab") as fh:
        fh.write((canonical_json(forged) + "\n").encode())
    report = assert_broken(log, 6, "not anchored")
    assert not report.recoverable  # unlike an interrupted append, nothing announced it
    with pytest.raises(AuditError, match="does not match"):
        log.append(stage_body(6))
    with pytest.raises(AuditError, match="does not match"):
        log.recover()


def test_an_appended_junk_line_is_caught(log: AuditLog) -> None:
    with log.path.open("ab") as fh:
        fh.write(b"{}\n")
    assert_broken(log, 6, "chain field 'seq' is missing")


@pytest.mark.parametrize("k", [1, 3])
def test_a_cut_off_tail_is_caught(log: AuditLog, k: int) -> None:
    write_lines(log, lines(log)[:-k])
    assert_broken(log, 6 - k, "the tail was cut off")
    with pytest.raises(AuditError, match="does not match"):
        log.append(stage_body(7))


def test_a_cut_off_tail_with_a_rewritten_head_is_caught_by_the_external_anchor(log: AuditLog) -> None:
    anchor = log.verify()
    ls = lines(log)[:-2]
    write_lines(log, ls)
    log._write_head(Head(4, json.loads(ls[-1])["hash"]))
    assert log.verify().ok  # the local head alone cannot tell: this is why it is copied elsewhere
    assert_broken(log, 4, "cut off", expect_count=anchor.count)
    assert_broken(log, 3, "rewritten", expect_hash=anchor.head_hash)


def test_external_anchor_that_is_older_than_the_log(log: AuditLog) -> None:
    recs = list(log.records())
    assert log.verify(expect_hash=recs[-1]["hash"], expect_count=6).ok
    assert_broken(log, 5, "not covered", expect_count=5)
    assert_broken(log, 4, "ends at record 3", expect_hash=recs[3]["hash"])


def test_a_record_rehashed_after_an_edit_in_the_middle_is_caught(log: AuditLog) -> None:
    ls = lines(log)
    ls[2] = resealed(ls[2], stage="evil")
    write_lines(log, ls)
    assert_broken(log, 3, "does not match record 2's hash")


def test_the_last_record_rehashed_after_an_edit_is_caught(log: AuditLog) -> None:
    ls = lines(log)
    ls[-1] = resealed(ls[-1], runner="gpu")
    write_lines(log, ls)
    assert_broken(log, 5, "edited and re-hashed")
    with pytest.raises(AuditError, match="does not match"):
        log.append(stage_body(6))


def test_a_second_genesis_is_caught(log: AuditLog) -> None:
    ls = lines(log)
    ls[3] = resealed(ls[3], kind="genesis")
    write_lines(log, ls)
    assert_broken(log, 3, "no other record may be")


def test_a_missing_head_fails_verify_and_append(log: AuditLog) -> None:
    log.head_path.unlink()
    assert_broken(log, None, "head anchor missing")
    with pytest.raises(AuditError, match="head anchor missing"):
        log.append(stage_body(6))


def test_a_torn_last_line_not_from_a_crash_is_caught_and_not_repaired(log: AuditLog) -> None:
    ls = lines(log)
    ls[-1] = ls[-1][:40]
    write_lines(log, ls)
    assert_broken(log, 5, "incomplete")
    before = log.path.read_bytes()
    with pytest.raises(AuditError, match="not announced"):
        log.append(stage_body(6))
    with pytest.raises(AuditError, match="not announced"):
        log.recover()
    assert log.path.read_bytes() == before


# ---- the line limit ----------------------------------------------------------------------
LIMIT = "longer than the 1 MiB limit for one audit record"


def test_the_limit_is_far_above_real_records_and_exact(log: AuditLog) -> None:
    """A stage record with 2,000 outputs is a few hundred KiB; a line of exactly the limit is
    written, verified, listed and read back as the tail, and one byte more is refused unwritten."""
    many = {f"data/forge/adapters/delta-{i:04d}": sha256_json(i) for i in range(2000)}
    body = stage_body(6)
    body["outputs"] = many
    log.append(body)
    assert len(lines(log)[-1]) < MAX_AUDIT_LINE_BYTES // 3
    log.append({"kind": "note", "blob": ""})
    pad = MAX_AUDIT_LINE_BYTES - len(lines(log)[-1])
    log.append({"kind": "note", "blob": "x" * pad})  # seq 8, as many digits as seq 7
    assert len(lines(log)[-1]) == MAX_AUDIT_LINE_BYTES
    assert log.verify().ok and len(list(log.records())) == 9
    assert log.append(stage_body(9))["seq"] == 9  # the tail read takes a line of the limit
    before, head = log.path.read_bytes(), log.head_path.read_bytes()
    # one byte more blob, one more digit of seq (10): two bytes over
    with pytest.raises(AuditError, match=r"record 10 would be a line of 1,048,578 bytes, over the 1 MiB limit "
                                         r"for one audit record \(fix: put digests"):
        log.append({"kind": "note", "blob": "x" * (pad + 1)})
    assert log.path.read_bytes() == before and log.head_path.read_bytes() == head  # not even announced


def _huge_tail(log: AuditLog, size: int, newline: bool) -> None:
    """A last "line" of `size` zero bytes that takes no disk (a binary file appended to the log)."""
    with log.path.open("r+b") as fh:
        end = fh.seek(0, os.SEEK_END)
        fh.truncate(end + size)
        if newline:
            fh.seek(0, os.SEEK_END)
            fh.write(b"\n")


@pytest.mark.parametrize("newline", [True, False])
def test_a_huge_line_is_reported_without_being_read_whole(log: AuditLog, newline: bool) -> None:
    _huge_tail(log, 256 << 20, newline)  # 256 MiB
    tracemalloc.start()
    try:
        report = assert_broken(log, 6, f"the line is {LIMIT}, so lmforge did not write it (fix: restore the log")
        with pytest.raises(AuditError, match=f"{log.path}:7: the line is {LIMIT}.*audit verify --log"):
            list(log.records())
        with pytest.raises(AuditError, match=f"{log.path}: last record: the line is {LIMIT}.*refusing to append"):
            log.append(stage_body(6))
        with pytest.raises(AuditError, match="refusing to append"):
            log.recover()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert report.count == 6
    assert peak < 8 * MAX_AUDIT_LINE_BYTES, peak  # a few MiB at most, never the 256 MiB line


def test_a_huge_first_line_is_refused_by_chain_id(tmp_path: Path) -> None:
    log = AuditLog(tmp_path / "log.jsonl")
    log.path.touch()
    _huge_tail(log, MAX_AUDIT_LINE_BYTES, newline=True)  # with its newline, one byte over
    with pytest.raises(AuditError, match=f"{log.path}:1: genesis record unreadable: the line is {LIMIT}"):
        log.chain_id()


# ---- crashes -----------------------------------------------------------------------------
def test_crash_before_head_commit_is_distinct_and_the_next_append_commits_it(
    log: AuditLog, crash_before_commit: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    with pytest.raises(Crash):
        log.append(stage_body(6))
    assert len(lines(log)) == 7 and log.head().count == 6
    report = assert_broken(log, 6, "interrupted append")
    assert report.recoverable
    monkeypatch.undo()
    rec = log.append(stage_body(7))
    assert rec["seq"] == 7
    report = log.verify()
    assert report.ok and report.count == 8


def test_recover_commits_an_announced_record(log: AuditLog, crash_before_commit: None, monkeypatch) -> None:
    with pytest.raises(Crash):
        log.append(stage_body(6))
    monkeypatch.undo()
    assert log.recover() == "committed record 6"
    assert log.verify().count == 7 and log.verify().ok
    assert log.recover() == "nothing to recover"


def test_crash_during_the_first_append_leaves_a_recoverable_genesis(
    tmp_path: Path, crash_before_commit, monkeypatch
) -> None:
    log = AuditLog(tmp_path / "log.jsonl", tmp_path / "anchor" / "head.json")
    with pytest.raises(Crash):
        log.append(stage_body(0))
    assert assert_broken(log, 0, "interrupted append").recoverable
    monkeypatch.undo()
    assert log.append(stage_body(0))["seq"] == 1
    assert log.verify().ok and log.verify().count == 2


def _torn_by_a_crash(log: AuditLog, monkeypatch: pytest.MonkeyPatch, keep: float) -> None:
    """Record 6 announced in the head, then cut short as SIGKILL mid-write leaves it."""
    with pytest.raises(Crash):
        log.append(stage_body(6))
    monkeypatch.undo()
    ls = lines(log)
    ls[-1] = ls[-1][: int(len(ls[-1]) * keep)]
    write_lines(log, ls)
    assert_broken(log, 6, "incomplete")


def test_next_append_drops_a_torn_announced_line_itself(
    log: AuditLog, crash_before_commit, monkeypatch
) -> None:
    _torn_by_a_crash(log, monkeypatch, keep=0.33)
    assert log.append(stage_body(7))["seq"] == 6
    assert log.verify().ok and log.verify().count == 7


def test_crash_mid_write_leaves_a_torn_line_that_recover_drops(
    log: AuditLog, crash_before_commit, monkeypatch
) -> None:
    _torn_by_a_crash(log, monkeypatch, keep=0.5)
    assert log.recover().startswith("dropped the torn, uncommitted record 6")
    assert log.verify().ok and log.verify().count == 6
    assert log.append(stage_body(6))["seq"] == 6
    assert log.verify().ok


def test_a_failed_write_leaves_no_torn_record(log: AuditLog, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_space(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(audit.os, "fsync", no_space)
    with pytest.raises(OSError, match="No space"):
        log.append(stage_body(6))
    monkeypatch.undo()
    assert len(lines(log)) == 6
    assert log.verify().ok and log.append(stage_body(6))["seq"] == 6


# ---- record shape and body checks -------------------------------------------------------
@pytest.mark.parametrize(
    ("body", "phrase"),
    [
        ({"seq": 3}, "chain fields"),
        ({"hash": "x", "prev_hash": "y"}, "chain fields"),
        ({"kind": "genesis"}, "not allowed"),
        ({"x": float("nan")}, "not JSON-serialisable"),
        ({"x": object()}, "not JSON-serialisable"),
    ],
)
def test_bad_bodies_are_refused_before_writing(log: AuditLog, body: dict[str, Any], phrase: str) -> None:
    before = log.path.read_bytes()
    with pytest.raises(AuditError, match=phrase):
        log.append(body)
    assert log.path.read_bytes() == before


def test_build_stage_record_shape_and_checks() -> None:
    body = stage_body(1)
    assert set(body) == {
        "kind", "stage", "inputs", "outputs", "params_digest", "code", "environment",
        "runner", "mlflow_run_id", "started", "finished", "extra",
    }  # fmt: skip
    args = {k: v for k, v in body.items() if k != "kind"}
    with pytest.raises(AuditError, match="inputs must be"):
        build_stage_record(**{**args, "inputs": {"data/x": "not-a-digest"}})
    with pytest.raises(AuditError, match="code must be"):
        build_stage_record(**{**args, "code": {"commit": None}})
    with pytest.raises(AuditError, match="finished must be"):
        build_stage_record(**{**args, "finished": "yesterday"})


# ---- CLI ---------------------------------------------------------------------------------
def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "lmforge.cli", "audit", *args]
    return subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=60)


def test_cli_verify_exit_codes_and_messages(log: AuditLog) -> None:
    head = log.verify().head_hash
    ok = run_cli("verify", "--log", str(log.path))
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == f"audit chain OK: 6 records, head {head}"
    ls = lines(log)
    ls[2] = resealed(ls[2], stage="evil")
    write_lines(log, ls)
    bad = run_cli("verify", "--log", str(log.path), "--expect-hash", head, "--expect-count", "6")
    assert bad.returncode == 1
    assert f"audit chain BROKEN at record 3 (line 4 of {log.path}): prev_hash" in bad.stderr
    missing = run_cli("verify", "--log", str(log.path.parent / "nope.jsonl"))
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def test_cli_show(log: AuditLog, capsys: pytest.CaptureFixture[str]) -> None:
    log.append(stage_body(9, stage="sft"))
    recs = list(log.records())
    assert cli.main(["audit", "show", "--log", str(log.path)]) == 0
    out = capsys.readouterr().out
    assert out.count("\n#") == 6 and out.startswith("#0    ")
    assert "chain=" + recs[0]["chain_id"] in out
    assert f"#3    {recs[3]['ts']}  stage  pretrain  runner=cpu  mlflow=run2  code=c0ffee000000  " in out
    assert f"code=c0ffee000000+dirty  params={recs[2]['params_digest'][:12]}" in out
    assert f"in : data/tokenizer={recs[3]['inputs']['data/tokenizer'][:12]}" in out

    assert cli.main(["audit", "show", "--log", str(log.path), "--last", "2"]) == 0
    shown = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith("#")]
    assert shown == ["#5", "#6"]

    assert cli.main(["audit", "show", "--log", str(log.path), "--stage", "pretrain", "--last", "1"]) == 0
    shown = [ln.split()[0] for ln in capsys.readouterr().out.splitlines() if ln.startswith("#")]
    assert shown == ["#5"]

    assert cli.main(["audit", "show", "--log", str(log.path), "--json"]) == 0
    assert [json.loads(ln) for ln in capsys.readouterr().out.splitlines()] == recs
    assert capsys.readouterr().out.encode() == b""  # nothing left over
    assert lines(log) == [(canonical_json(r) + "\n").encode() for r in recs]


def test_cli_show_names_the_bad_line(log: AuditLog, capsys: pytest.CaptureFixture[str]) -> None:
    ls = lines(log)
    ls[1] = b"not json\n"
    write_lines(log, ls)
    assert cli.main(["audit", "show", "--log", str(log.path)]) == 2
    assert f"{log.path}:2: the line is not valid JSON" in capsys.readouterr().err


# ---- concurrency -------------------------------------------------------------------------
WORKER = """
import sys, time
from pathlib import Path
from lmforge.audit import AuditLog
log_path, go, worker, n = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
while not go.exists():  # start together, so the appends really contend
    time.sleep(0.001)
log = AuditLog(log_path)
for i in range(n):
    log.append({"stage": "conc", "worker": worker, "i": i})
"""


def test_8_processes_x_50_concurrent_appends_leave_a_valid_chain(tmp_path: Path) -> None:
    log, go, workers, per = AuditLog(tmp_path / "audit" / "log.jsonl"), tmp_path / "go", 8, 50
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(log.path), str(go), str(w), str(per)],
            env=ENV,
            stderr=subprocess.PIPE,
            text=True,
        )
        for w in range(workers)
    ]
    time.sleep(0.3)  # let the interpreters start before the gun
    go.touch()
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
    report = log.verify()
    assert report.ok, report.problem
    assert report.count == 1 + workers * per
    recs = list(log.records())
    assert [r["seq"] for r in recs] == list(range(1 + workers * per))
    assert sum(r["kind"] == "genesis" for r in recs) == 1
    assert sorted((r["worker"], r["i"]) for r in recs[1:]) == [
        (w, i) for w in range(workers) for i in range(per)
    ]
    for w in range(workers):  # each process's own appends keep their order
        assert [r["i"] for r in recs[1:] if r["worker"] == w] == list(range(per))
    interleaved = sum(a["worker"] != b["worker"] for a, b in zip(recs[1:], recs[2:], strict=False))
    assert interleaved > workers  # they really ran at the same time
