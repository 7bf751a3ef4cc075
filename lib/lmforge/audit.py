"""Hash-chained, append-only audit log: one canonical-JSON record per line.

Use it like this (the stage wrapper appends one record per stage run)::

    from lmforge.audit import AuditLog, build_stage_record, utc_now
    log = AuditLog("audit/log.jsonl")                 # head anchor: audit/head.json
    rec = log.append(build_stage_record(stage="mix", ...))
    report = log.verify()                             # or: lmforge audit verify
    assert report.ok, report.problem

and from the shell: `lmforge audit verify [--expect-hash H --expect-count N]`, `lmforge audit show`.

Signed heads (optional, lmforge.signing). `AuditLog(path, signer=Signer.from_file(key, where))`
signs every new head with an Ed25519 key, under the lock, into `<head>.sig` (`audit/head.sig`);
`verify(public_key=...)` then also requires that signature to be valid, made by that key and to
cover the current head. The hash chain alone cannot stop someone who rewrites the log and the
head together; the signature can, as long as they lack the private key.

Records. Line L (1-based) holds the record with `seq` L-1. Record 0 is the genesis
(`kind: "genesis"`, a random `chain_id`, `prev_hash` of 64 zeros). Every record carries `seq`,
`kind`, `prev_hash` (the previous record's `hash`), `ts` (ISO-8601 UTC append time), its body,
and `hash` = SHA-256 of the canonical JSON of the record without `hash`. A line must equal the
canonical JSON of its record, so even a whitespace or key-order change is caught. A line is at
most `lmforge.inputs.MAX_AUDIT_LINE_BYTES` (1 MiB, with its newline): `append` refuses a bigger
record, and every reader stops at the limit instead of holding a longer line in memory.

Head anchor. `head.json` holds `{"count", "hash"}` of the last committed record, so cutting
records off the end (which leaves a self-consistent shorter chain) is caught; callers should
copy the head to a second place (the MLflow parent run) and pass it back as `--expect-hash`.

Commit protocol (all under `<log>.lock`, so concurrent processes are serialised):
1. announce: the head gets `"pending": {"seq", "hash"}` of the record about to be written;
2. append the line to the log, fsync;
3. commit: the head moves to `count + 1` and drops `pending`.
A crash after 2 leaves the log one record ahead of the head. Because the record was announced,
it is told apart from a record forged onto the end: `verify` reports it as an interrupted append
(`recoverable=True`, still not ok) and the next `append` (or `recover()`) commits it. A crash
during 2 leaves a torn last line, which `verify` reports and `append` refuses; `recover()` drops
it only when the head shows it was an announced, uncommitted record. Nothing else is ever
repaired automatically: an edited chain must be restored from a copy.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import uuid
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from filelock import FileLock, Timeout

from .atomic import write_text
from .digest import canonical_json, sha256_json
from .errors import AuditError
from .inputs import MAX_AUDIT_LINE_BYTES, size_text

if TYPE_CHECKING:  # cryptography is imported only where a chain is signed or its signature checked
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from .signing import SignatureReport, Signer

ZERO_HASH = "0" * 64
FORMAT = "lmforge-audit/1"
CHAIN_FIELDS = ("seq", "prev_hash", "hash", "ts")  # set by the chain, never by a body
_HEX64 = re.compile(r"[0-9a-f]{64}")
_TAIL_BLOCK = 1 << 16


def utc_now() -> str:
    """The timestamp format of every record: ISO-8601, UTC, microseconds, `Z` suffix."""
    return datetime.now(UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class _Bad(ValueError):
    """A record that fails a check; the text says what is wrong."""


def _parse_line(line: bytes) -> dict[str, Any]:
    """Parse one log line (with its newline) and check everything that needs no neighbour."""
    if not line.endswith(b"\n"):
        raise _Bad("the line is incomplete (no trailing newline): an append was interrupted")
    try:
        rec = json.loads(line)
    except UnicodeDecodeError:
        raise _Bad("the line is not valid UTF-8") from None
    except json.JSONDecodeError as e:
        raise _Bad(f"the line is not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(rec, dict):
        raise _Bad("the line is not a JSON object")
    if (canonical_json(rec) + "\n").encode("utf-8") != line:
        raise _Bad("the line is not in canonical form (a byte was changed: spacing, key order or escaping)")
    for name, kind, want in (("seq", int, "an integer"), ("kind", str, "a string"), ("prev_hash", str, "a string"),
                             ("hash", str, "a string"), ("ts", str, "a string")):
        if type(rec.get(name)) is not kind:
            raise _Bad(f"chain field {name!r} is missing or not {want}")
    body = {k: v for k, v in rec.items() if k != "hash"}
    if sha256_json(body) != rec["hash"]:
        raise _Bad("the stored hash does not match the record's content: the record was edited")
    return rec


_TOO_LONG = (
    f"the line is longer than the {size_text(MAX_AUDIT_LINE_BYTES)} limit for one audit record, "
    "so lmforge did not write it"
)


def _lines(fh: BinaryIO) -> Iterator[bytes]:
    """The log's lines in order, each with its newline (the last may lack it); a line over
    MAX_AUDIT_LINE_BYTES raises _Bad after reading only the limit's worth of it."""
    while line := fh.readline(MAX_AUDIT_LINE_BYTES + 1):
        if len(line) > MAX_AUDIT_LINE_BYTES:
            raise _Bad(_TOO_LONG)
        yield line


@dataclass(frozen=True)
class Head:
    """The anchor: how many records are committed and the last one's hash."""

    count: int
    hash: str
    pending: tuple[int, str] | None = None  # (seq, hash) announced but not yet committed
    updated: str = ""


@dataclass(frozen=True)
class VerifyReport:
    """What `AuditLog.verify` found: ok, or the first bad record and how to fix it."""

    ok: bool
    count: int  # records that passed every check
    head_hash: str  # hash of the last record read (ZERO_HASH if none)
    first_bad_seq: int | None = None
    line: int | None = None  # 1-based line in the log of first_bad_seq
    problem: str = ""
    recoverable: bool = False  # an interrupted append that `recover()` / the next append commits
    signature: SignatureReport | None = None  # set when verify() was given a public key


_RESTORE = "restore the log and head from a backup; an edited chain cannot be repaired in place"


class AuditLog:
    """An append-only hash chain at `path`, anchored by `head_path` (default `<log dir>/head.json`)."""

    def __init__(
        self,
        path: str | Path,
        head_path: str | Path | None = None,
        *,
        lock_timeout: float = 120.0,
        signer: Signer | None = None,
    ):
        self.path = Path(path)
        self.head_path = Path(head_path) if head_path is not None else self.path.parent / "head.json"
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self.signature_path = self.head_path.with_suffix(".sig")  # audit/head.json -> audit/head.sig
        self.lock_timeout = lock_timeout
        self.signer = signer  # None: heads are not signed

    # ---- reading -------------------------------------------------------------------------
    def head(self) -> Head | None:
        """The head anchor, or None if the file does not exist. A malformed head raises AuditError."""
        try:
            raw = json.loads(self.head_path.read_bytes())
        except FileNotFoundError:
            return None
        except (ValueError, UnicodeDecodeError) as e:
            raise AuditError(f"{self.head_path}: not valid JSON ({e}) (fix: {_RESTORE})") from None
        if not isinstance(raw, dict):
            raise AuditError(f"{self.head_path}: not a JSON object (fix: {_RESTORE})")
        count, h, pending = raw.get("count"), raw.get("hash"), raw.get("pending")
        if type(count) is not int or count < 0 or not isinstance(h, str) or not _HEX64.fullmatch(h):
            raise AuditError(
                f"{self.head_path}: needs an int 'count' >= 0 and a sha256 'hash' (fix: {_RESTORE})"
            )
        pend = None
        if (
            isinstance(pending, dict)
            and type(pending.get("seq")) is int
            and isinstance(pending.get("hash"), str)
        ):
            pend = (pending["seq"], pending["hash"])
        return Head(count, h, pend, str(raw.get("updated", "")))

    def chain_id(self) -> str | None:
        """The genesis record's chain id (what external anchors are filed under); None if no log."""
        if not self.path.exists():
            return None
        try:
            with open(self.path, "rb") as fh:
                first = next(_lines(fh), b"")
            return _parse_line(first).get("chain_id") if first else None
        except _Bad as e:
            raise AuditError(
                f"{self.path}:1: genesis record unreadable: {e} (fix: run `lmforge audit verify --log {self.path}`)"
            ) from None

    def records(self) -> Iterator[dict[str, Any]]:
        """Yield every record in order; a line that does not parse raises AuditError naming it."""
        if not self.path.exists():
            raise AuditError(
                f"{self.path}: no audit log here (fix: check --log; the first audited stage creates it)"
            )
        with open(self.path, "rb") as fh:
            lines = _lines(fh)
            lineno = 0
            while True:
                lineno += 1
                try:
                    line = next(lines, None)
                    if line is None:
                        return
                    rec = _parse_line(line)
                except _Bad as e:
                    raise AuditError(
                        f"{self.path}:{lineno}: {e} (fix: run `lmforge audit verify --log {self.path}`)"
                    ) from None
                yield rec

    def verify(
        self,
        expect_hash: str | None = None,
        expect_count: int | None = None,
        *,
        public_key: Ed25519PublicKey | None = None,
    ) -> VerifyReport:
        """Check the whole chain, then the head anchor, then the optional external anchor, then,
        given a trusted `public_key`, the head's signature (`report.signature` says how it failed;
        `ok` is False unless the signature is good too)."""
        if not self.path.exists():
            return VerifyReport(False, 0, ZERO_HASH, problem=f"{self.path} does not exist (fix: check --log)")
        # One lock for both checks, so an append in between cannot make a good signature look stale.
        with self._locked(required=False):
            verifier = _Verifier(self)
            report = verifier.run(expect_hash, expect_count)
            if public_key is None or not report.ok:
                return report
            from . import signing

            hashes = verifier.hashes
            sig = signing.check(
                self.signature_path, public_key, str(verifier.chain_id), report.count, report.head_hash,
                lambda seq: hashes[seq] if 0 <= seq < len(hashes) else None,
            )
            return dataclasses.replace(report, ok=sig.ok, problem="" if sig.ok else sig.message, signature=sig)

    def sign(self, signer: Signer) -> dict[str, Any]:
        """Sign the current head after a full verify (`lmforge audit sign`): for a chain that was
        unsigned until now, or a head a crash left unsigned. Returns the signature document."""
        with self._locked(required=True):
            verifier = _Verifier(self)
            report = verifier.run(None, None) if self.path.exists() else None
            if report is None or not report.ok:
                problem = report.problem if report is not None else f"{self.path} does not exist"
                raise AuditError(f"{self.path}: refusing to sign a chain that does not verify: {problem}")
            return self._sign_head(signer, str(verifier.chain_id), Head(report.count, report.head_hash))

    # ---- writing -------------------------------------------------------------------------
    def append(self, body: dict[str, Any]) -> dict[str, Any]:
        """Append one record built from `body` and return it (with seq, prev_hash, ts and hash).

        Only the tail record is read and checked against the head, so an append costs the same
        on a long log; a full check is `verify()`. Creates the genesis record on first use.
        """
        body = _check_body(body)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._locked(required=True):
            created = not self.path.exists()
            # Unbuffered: after a failed write no buffered bytes may reach the file at close.
            with open(self.path, "a+b", buffering=0) as fh:
                if created:
                    _fsync_dir(self.path.parent)  # the new directory entry must survive a crash too
                # A crash mid-append (even SIGKILL mid-write) is finished or undone here, as
                # `lmforge audit recover` would; any other damage refuses the append.
                self._drop_torn(fh, self.head())
                head = self._reconcile(self.head(), self._tail(fh))
                chain: str | None = None
                if head.count == 0:
                    chain = uuid.uuid4().hex
                    genesis = {
                        "seq": 0,
                        "kind": "genesis",
                        "prev_hash": ZERO_HASH,
                        "ts": utc_now(),
                        "chain_id": chain,
                        "format": FORMAT,
                    }
                    head = self._commit(fh, head, _seal(genesis))
                record = {"kind": "stage", **body, "seq": head.count, "prev_hash": head.hash, "ts": utc_now()}
                committed = self._commit(fh, head, _seal(record))
                if self.signer is not None:
                    self._sign_head(self.signer, str(chain or self.chain_id()), committed)
                return record

    def recover(self) -> str:
        """Finish or undo an append a crash interrupted; returns what was done.

        Only acts when the head's `pending` announcement proves the extra bytes came from
        lmforge: a torn last line is truncated; a complete, linked, announced record is committed.
        """
        if not self.path.exists():
            raise AuditError(f"{self.path}: no audit log here (fix: check the path)")
        with self._locked(required=True), open(self.path, "r+b", buffering=0) as fh:
            head = self.head()
            if head is None:
                raise AuditError(
                    f"{self.head_path}: head anchor missing; nothing to recover against (fix: {_RESTORE})"
                )
            dropped = self._drop_torn(fh, head)
            if dropped:
                return dropped
            after = self._reconcile(head, self._tail(fh))
            return "nothing to recover" if after.count == head.count else f"committed record {head.count}"

    # ---- internals -----------------------------------------------------------------------
    @contextlib.contextmanager
    def _locked(self, *, required: bool) -> Iterator[None]:
        # A short poll keeps 8 contending writers from idling on the lock.
        lock = FileLock(str(self.lock_path), timeout=self.lock_timeout, poll_interval=0.002)
        acquired = False
        try:
            lock.acquire()
            acquired = True
        except Timeout:  # before OSError: Timeout is a TimeoutError
            raise AuditError(
                f"{self.lock_path}: still locked after {self.lock_timeout:.0f} s by another "
                "process (fix: wait for the running stage to finish)"
            ) from None
        except OSError as e:
            # verify must work on a read-only copy of the log, where no lock file can be made.
            if required:
                raise AuditError(
                    f"{self.lock_path}: cannot create the lock file ({e}) (fix: make "
                    f"{self.path.parent} writable)"
                ) from None
        try:
            yield
        finally:
            if acquired:
                lock.release()

    def _drop_torn(self, fh: BinaryIO, head: Head | None) -> str | None:
        """Truncate a torn last line that an interrupted append left; None if there is none.

        Only the exact state a crash mid-write leaves is repaired: the complete lines end at
        the committed head and the head announces the very next record. Anything else raises.
        """
        try:
            start, last = _last_line(fh)
        except _Bad as e:
            raise self._refuse(e) from None
        if not last or last.endswith(b"\n"):
            return None
        try:
            tail = _parse_line(_last_line(fh, end=start)[1]) if start else None
        except _Bad:
            tail, start = None, -1
        if start < 0 or head is None or head.pending is None or head.pending[0] != head.count or not _matches(head, tail):
            raise AuditError(
                f"{self.path}: the torn last line was not announced in {self.head_path}, so "
                f"no interrupted append explains it (fix: {_RESTORE})"
            )
        fh.truncate(start)
        os.fsync(fh.fileno())
        return f"dropped the torn, uncommitted record {head.count} ({len(last)} bytes)"

    def _tail(self, fh: BinaryIO) -> dict[str, Any] | None:
        try:
            _, line = _last_line(fh)
            return _parse_line(line) if line else None
        except _Bad as e:
            raise self._refuse(e) from None

    def _refuse(self, e: _Bad) -> AuditError:
        """The error that refuses an append because the last line is bad."""
        fix = "run `lmforge audit recover` if a crash interrupted an append, then " if "interrupted" in str(e) else ""
        return AuditError(
            f"{self.path}: last record: {e}; refusing to append (fix: {fix}run "
            f"`lmforge audit verify --log {self.path}`)"
        )

    def _reconcile(self, head: Head | None, tail: dict[str, Any] | None) -> Head:
        """Check the tail against the head; commit an announced record a crash left uncommitted."""
        verify = f"run `lmforge audit verify --log {self.path}` to find the damage, then {_RESTORE}"
        if tail is None:
            if head is not None and head.count > 0:
                raise AuditError(
                    f"{self.path}: the log is empty but {self.head_path} anchors {head.count} "
                    f"records: it was deleted or truncated (fix: {_RESTORE})"
                )
            return Head(0, ZERO_HASH)
        if head is None:
            raise AuditError(
                f"{self.head_path}: head anchor missing while {self.path} holds records; "
                f"lmforge never re-creates it since that would hide a cut-off tail (fix: {_RESTORE})"
            )
        if _matches(head, tail):
            return head
        if (
            head.pending == (tail["seq"], tail["hash"])
            and tail["seq"] == head.count
            and tail["prev_hash"] == head.hash
        ):
            committed = Head(head.count + 1, tail["hash"])
            self._write_head(committed)
            return committed
        raise AuditError(
            f"{self.path}: last record (seq {tail['seq']}, hash {tail['hash'][:12]}) does not match "
            f"{self.head_path} (count {head.count}, hash {head.hash[:12]}): records were cut off, "
            f"added or edited (fix: {verify})"
        )

    def _commit(self, fh: BinaryIO, head: Head, record: dict[str, Any]) -> Head:
        line = (canonical_json(record) + "\n").encode("utf-8")
        if len(line) > MAX_AUDIT_LINE_BYTES:  # before the announcement: nothing is written
            raise AuditError(
                f"{self.path}: record {record['seq']} would be a line of {size_text(len(line))}, over the "
                f"{size_text(MAX_AUDIT_LINE_BYTES)} limit for one audit record (fix: put digests and short "
                "values in the record, not file contents; store large data as a file and record its sha256)"
            )
        self._write_head(Head(head.count, head.hash, (record["seq"], record["hash"])))
        size = fh.seek(0, os.SEEK_END)
        try:
            view = memoryview(line)
            while view:  # a raw write may be short
                written = fh.write(view)
                if not written:
                    raise OSError(f"{self.path}: write made no progress")
                view = view[written:]
            os.fsync(fh.fileno())
        except BaseException:
            # A failed write (disk full, Ctrl-C) must not leave a torn record behind.
            with contextlib.suppress(OSError):
                fh.truncate(size)
            raise
        committed = Head(record["seq"] + 1, record["hash"])
        self._write_head(committed)
        return committed

    def _sign_head(self, signer: Signer, chain_id: str, head: Head) -> dict[str, Any]:
        """Write the signature of `head`; the caller holds the lock, so no newer head can be
        signed first and then overwritten by this older one."""
        try:
            return signer.write(self.signature_path, chain_id, head.count, head.hash, utc_now())
        except OSError as e:
            raise AuditError(
                f"{self.signature_path}: record {head.count - 1} is committed but its head could not be "
                f"signed ({e.strerror or e}) (fix: make {self.signature_path.parent} writable, then run "
                f"`lmforge audit sign --log {self.path}`)"
            ) from None

    def _write_head(self, head: Head) -> None:
        doc: dict[str, Any] = {"count": head.count, "hash": head.hash, "updated": utc_now()}
        if head.pending is not None:
            doc["pending"] = {"seq": head.pending[0], "hash": head.pending[1]}
        write_text(self.head_path, canonical_json(doc) + "\n")


def _matches(head: Head, tail: dict[str, Any] | None) -> bool:
    if tail is None:
        return head.count == 0
    return tail["seq"] == head.count - 1 and tail["hash"] == head.hash


def _last_line(fh: BinaryIO, end: int | None = None) -> tuple[int, bytes]:
    """(offset, bytes) of the last line ending at `end` (default EOF), read backwards in blocks;
    a line over MAX_AUDIT_LINE_BYTES raises _Bad once that much of it has been read."""
    end = fh.seek(0, os.SEEK_END) if end is None else end
    pos, buf = end, b""
    while pos > 0:
        step = min(_TAIL_BLOCK, pos)
        pos -= step
        fh.seek(pos)
        buf = fh.read(step) + buf
        # The last byte is the line's own newline; the one before it starts the line.
        cut = buf.rfind(b"\n", 0, len(buf) - 1)
        if len(buf) - (cut + 1) > MAX_AUDIT_LINE_BYTES:
            raise _Bad(_TOO_LONG)
        if cut >= 0:
            return pos + cut + 1, buf[cut + 1 :]
    return 0, buf


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _check_body(body: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise AuditError(f"audit record body must be a dict, got {type(body).__name__}")
    clash = sorted(k for k in body if k in CHAIN_FIELDS)
    if clash:
        raise AuditError(
            f"audit record body sets chain fields {clash} (fix: rename them; the chain sets {list(CHAIN_FIELDS)})"
        )
    kind = body.get("kind", "stage")
    if not isinstance(kind, str) or not kind or kind == "genesis":
        raise AuditError(
            f"audit record kind {kind!r} is not allowed (fix: a non-empty string other than 'genesis')"
        )
    try:
        # The round trip makes the returned record equal what verify will read back (tuples -> lists, ...).
        return json.loads(canonical_json(body).encode("utf-8"))
    except (TypeError, ValueError) as e:
        raise AuditError(
            f"audit record body is not JSON-serialisable: {e} (fix: use only str, int, "
            "finite float, bool, None, list and dict with str keys)"
        ) from None


def _seal(record: dict[str, Any]) -> dict[str, Any]:
    record["hash"] = sha256_json(record)
    return record


_NOT_COVERED = "not covered by it (fix: pass the anchor saved by the latest run, or treat them as unverified)"


def _span(first: int, last: int) -> str:
    return f"record {first}" if first == last else f"records {first}..{last}"


class _Verifier:
    """One pass over the log; `run` returns the first problem found, or ok."""

    def __init__(self, log: AuditLog):
        self.log = log
        self.hashes: list[str] = []
        self.last: dict[str, Any] | None = None
        self.chain_id: str | None = None

    def fail(self, seq: int | None, problem: str, *, recoverable: bool = False) -> VerifyReport:
        line = None if seq is None else seq + 1
        last = self.hashes[-1] if self.hashes else ZERO_HASH
        return VerifyReport(False, len(self.hashes), last, seq, line, problem, recoverable)

    def run(self, expect_hash: str | None, expect_count: int | None) -> VerifyReport:
        with open(self.log.path, "rb") as fh:
            lines = _lines(fh)
            seq = 0
            while True:
                try:
                    line = next(lines, None)
                except _Bad as e:
                    return self.fail(seq, f"{e} (fix: {_RESTORE})")
                if line is None:
                    break
                if (problem := self.check(seq, line)) is not None:
                    return self.fail(seq, problem)
                seq += 1
        if not self.hashes:
            return self.fail(None, f"{self.log.path} is empty: not even a genesis record (fix: {_RESTORE})")
        return (
            self.check_head()
            or self.check_expected(expect_hash, expect_count)
            or VerifyReport(True, len(self.hashes), self.hashes[-1])
        )

    def check(self, seq: int, line: bytes) -> str | None:
        """The problem with line `seq` + 1 and its fix, or None if the record is sound and linked."""
        try:
            rec = _parse_line(line)
        except _Bad as e:
            if not line.endswith(b"\n"):  # a torn last line: a crash mid-append, or damage
                return (
                    f"{e} (fix: run `lmforge audit recover`, which drops it only if {self.log.head_path} "
                    f"announced the append; if it refuses, {_RESTORE})"
                )
            return f"{e} (fix: {_RESTORE})"
        prev = self.hashes[-1] if self.hashes else ZERO_HASH
        if rec["seq"] != seq:
            return (
                f"seq is {rec['seq']} where {seq} was expected: a record was deleted, inserted or reordered "
                f"(fix: {_RESTORE})"
            )
        if (rec["kind"] == "genesis") != (seq == 0):
            return (
                "record 0 must be the genesis and no other record may be"
                if seq
                else "record 0 is not a genesis"
            ) + f" (fix: {_RESTORE})"
        if rec["prev_hash"] != prev:
            return (
                f"prev_hash {rec['prev_hash'][:12]} does not match record {seq - 1}'s hash {prev[:12]}: "
                f"an earlier record was changed, removed or re-hashed (fix: {_RESTORE})"
            )
        self.hashes.append(rec["hash"])
        self.last = rec
        if seq == 0:
            self.chain_id = rec.get("chain_id")
        return None

    def check_head(self) -> VerifyReport | None:
        n, hashes = len(self.hashes), self.hashes
        try:
            head = self.log.head()
        except AuditError as e:
            return self.fail(None, str(e))
        if head is None:
            return self.fail(
                None,
                f"{self.log.head_path}: head anchor missing, so a cut-off tail cannot be "
                f"ruled out (fix: {_RESTORE}, or pass --expect-hash/--expect-count)",
            )
        where = f"{self.log.head_path} anchors {head.count} records ending in {head.hash[:12]}"
        if head.count > n:
            return self.fail(
                n,
                f"the log ends at record {n - 1} but {where}: the tail was cut off, "
                f"{_span(n, head.count - 1)} missing (fix: {_RESTORE})",
            )
        if (hashes[head.count - 1] if head.count else ZERO_HASH) != head.hash:
            seq = max(head.count - 1, 0)
            return self.fail(
                seq,
                f"record {seq}'s hash {hashes[seq][:12]} differs from the anchor: {where}; "
                f"the record was edited and re-hashed, or the log replaced (fix: {_RESTORE})",
            )
        if head.count == n:
            return None
        if head.count == n - 1 and head.pending == (n - 1, hashes[-1]):
            return self.fail(
                n - 1,
                f"interrupted append: record {n - 1} was announced in {self.log.head_path} and "
                "written, but a crash stopped the head update (fix: the next append commits it, "
                "or run `lmforge audit recover`)",
                recoverable=True,
            )
        return self.fail(
            head.count,
            f"not anchored: {where}, so {_span(head.count, n - 1)} "
            f"was appended outside lmforge (fix: {_RESTORE})",
        )

    def check_expected(self, expect_hash: str | None, expect_count: int | None) -> VerifyReport | None:
        n, hashes = len(self.hashes), self.hashes
        if expect_count is not None and expect_count != n:
            if expect_count > n:
                return self.fail(
                    n,
                    f"the external anchor expects {expect_count} records but the log and head hold "
                    f"{n}: records were cut off and the head rewritten (fix: {_RESTORE})",
                )
            return self.fail(
                expect_count,
                f"the external anchor expects {expect_count} records; {_span(expect_count, n - 1)} "
                f"{_NOT_COVERED}",
            )
        if expect_hash is not None and expect_hash != hashes[-1]:
            if expect_hash in hashes:
                seq = hashes.index(expect_hash) + 1
                return self.fail(
                    seq,
                    f"the external anchor ends at record {seq - 1}; {_span(seq, n - 1)} {_NOT_COVERED}",
                )
            return self.fail(
                n - 1,
                f"the chain ends in {hashes[-1][:12]} but the external anchor expects "
                f"{expect_hash[:12]}: the chain was rewritten (fix: {_RESTORE})",
            )
        return None


# ---- record shape --------------------------------------------------------------------------
def build_stage_record(
    stage: str,
    inputs: dict[str, str],
    outputs: dict[str, str],
    params_digest: str,
    code: dict[str, Any],
    environment: dict[str, Any],
    runner: str,
    mlflow_run_id: str | None,
    started: str,
    finished: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The body of a stage record, defined in one place; pass it to `AuditLog.append`.

    inputs/outputs map a name (path) to its sha256 hex digest; `code` needs `commit` and `dirty`;
    `environment` needs `python`, `torch` and `device` (None where absent); times are ISO-8601.
    """

    def bad(field: str, want: str) -> AuditError:
        return AuditError(f"audit record for stage {stage!r}: {field} must be {want}")

    if not isinstance(stage, str) or not stage:
        raise bad("stage", "a non-empty string")
    for field, digests in (("inputs", inputs), ("outputs", outputs)):
        if not isinstance(digests, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and _HEX64.fullmatch(v) for k, v in digests.items()
        ):
            raise bad(field, "a dict of name -> sha256 hex digest (lmforge.digest.sha256_path)")
    if not isinstance(params_digest, str) or not _HEX64.fullmatch(params_digest):
        raise bad("params_digest", "a sha256 hex digest (lmforge.digest.sha256_json of the stage config)")
    if not isinstance(code, dict) or not {"commit", "dirty"} <= code.keys():
        raise bad("code", "a dict with 'commit' (git sha or None) and 'dirty' (bool or None)")
    if not isinstance(environment, dict) or not {"python", "torch", "device"} <= environment.keys():
        raise bad("environment", "a dict with 'python', 'torch' and 'device' (None where absent)")
    if not isinstance(runner, str) or not runner:
        raise bad("runner", "a non-empty string (e.g. 'cpu', 'gpu')")
    if mlflow_run_id is not None and not isinstance(mlflow_run_id, str):
        raise bad("mlflow_run_id", "a string or None")
    for field, value in (("started", started), ("finished", finished)):
        try:
            datetime.fromisoformat(value)
        except (TypeError, ValueError):
            raise bad(field, "an ISO-8601 timestamp (lmforge.audit.utc_now())") from None
    return {
        "kind": "stage",
        "stage": stage,
        "inputs": dict(inputs),
        "outputs": dict(outputs),
        "params_digest": params_digest,
        "code": dict(code),
        "environment": dict(environment),
        "runner": runner,
        "mlflow_run_id": mlflow_run_id,
        "started": started,
        "finished": finished,
        "extra": dict(extra or {}),
    }


# ---- CLI -----------------------------------------------------------------------------------
_SIG_LABEL = {"UNSIGNED": "MISSING", "BAD_SIGNATURE": "BAD", "STALE": "STALE (older head)", "WRONG_KEY": "WRONG KEY"}


def cli_verify(args: argparse.Namespace, public_key: Ed25519PublicKey | None = None, key_source: str = "") -> int:
    """Exit 0 (intact; signed by `public_key` when one is given), 1 (chain broken), or the
    signing.Status code of a signature problem (4 missing, 5 bad, 6 older head, 7 wrong key)."""
    log = AuditLog(args.log, args.head)
    report = log.verify(expect_hash=args.expect_hash, expect_count=args.expect_count, public_key=public_key)
    sig = report.signature
    chain_ok = report.ok or (sig is not None and sig.status.name != "NOT_IN_CHAIN")
    if chain_ok:
        print(f"audit chain OK: {report.count} records, head {report.head_hash}")
    if report.ok:
        if sig is not None:
            print(f"signature OK: {log.signature_path} covers this head, {sig.message} (trusted key: {key_source})")
        elif log.signature_path.exists():
            print(f"note: {log.signature_path} was not checked (fix: pass --public-key PATH, or set "
                  "params.yaml: pipeline.audit_public_key)", file=sys.stderr)
        return 0
    if chain_ok and sig is not None:
        print(f"audit signature {_SIG_LABEL[sig.status.name]}: {sig.message}", file=sys.stderr)
        return int(sig.status)
    where = (
        ""
        if report.first_bad_seq is None
        else f" at record {report.first_bad_seq} (line {report.line} of {log.path})"
    )
    print(f"audit chain BROKEN{where}: {report.problem}", file=sys.stderr)
    return 1


def cli_sign(args: argparse.Namespace, signer: Signer) -> int:
    log = AuditLog(args.log, args.head)
    doc = log.sign(signer)
    print(f"signed head {doc['head_hash']} ({doc['count']} records) of chain {doc['chain_id']} with key "
          f"{doc['key_id']} -> {log.signature_path}")
    return 0


def format_record(rec: dict[str, Any]) -> str:
    """A record as one to three readable lines (digests shortened to 12 hex digits)."""

    def short(digest: object) -> str:
        return str(digest)[:12]

    head = f"#{rec['seq']:<4} {rec['ts']}  {rec['kind']}"
    if rec["kind"] == "genesis":
        return f"{head}  chain={rec.get('chain_id')}  hash={short(rec['hash'])}"
    if rec["kind"] != "stage":  # a decision a stage recorded (e.g. govern.transition): its own fields
        chain = {"seq", "kind", "ts", "hash", "prev_hash", "stage", "mlflow_run_id"}
        fields = {k: v for k, v in rec.items() if k not in chain}
        return f"{head}  {rec.get('stage', '-')}  {canonical_json(fields)}  hash={short(rec['hash'])}"
    code = rec.get("code") or {}
    commit = short(code.get("commit") or "unknown") + ("+dirty" if code.get("dirty") else "")
    parts = [
        head,
        rec.get("stage", "-"),
        f"runner={rec.get('runner', '-')}",
        f"mlflow={rec.get('mlflow_run_id') or '-'}",
        f"code={commit}",
        f"params={short(rec.get('params_digest', '-'))}",
        f"hash={short(rec['hash'])}",
    ]
    lines = ["  ".join(parts)]
    for label, key in (("in ", "inputs"), ("out", "outputs")):
        digests = rec.get(key) or {}
        if digests:
            lines.append(
                f"      {label}: " + "  ".join(f"{k}={short(v)}" for k, v in sorted(digests.items()))
            )
    return "\n".join(lines)


def cli_show(args: argparse.Namespace) -> int:
    if args.last is not None and args.last < 1:
        raise AuditError(f"--last must be a positive number of records, got {args.last}")
    recs: Iterator[dict[str, Any]] = AuditLog(args.log, getattr(args, "head", None)).records()
    if args.stage is not None:
        recs = (r for r in recs if r.get("stage") == args.stage)
    # --last applies after --stage: the last N records of that stage.
    selected = deque(recs, maxlen=args.last) if args.last is not None else recs
    for rec in selected:
        print(canonical_json(rec) if args.json else format_record(rec))
    return 0
