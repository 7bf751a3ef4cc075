"""Signed audit heads: keygen, a sign/verify round trip through the real AuditLog, each way a
signature check fails (with its own exit code), bad key files named with their params key, and
the signature written by the stage wrapper and by the flow's stage.remote append."""

from __future__ import annotations

import base64
import json
import os
import stat
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from lmforge import cli, signing
from lmforge.audit import AuditLog
from lmforge.digest import canonical_json, sha256_json
from lmforge.errors import ConfigError
from lmforge.signing import Signer, Status
from stages import dag

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT / "lib"), str(ROOT)) if p)}


def body(i: int) -> dict[str, Any]:
    return {"stage": "pretrain", "i": i}


@pytest.fixture
def keys(tmp_path: Path) -> tuple[Path, Path]:
    priv, pub, _ = signing.generate_keypair(tmp_path / "keys" / "audit.pem")
    return priv, pub


@pytest.fixture
def log(tmp_path: Path, keys: tuple[Path, Path]) -> AuditLog:
    """Genesis + 4 records, the head signed after every append."""
    log = AuditLog(tmp_path / "audit" / "log.jsonl", signer=Signer.from_file(keys[0], "test"))
    for i in range(4):
        log.append(body(i))
    return log


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli_run(capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    """`lmforge ...` in-process (a CLI subprocess costs seconds of imports); exit code and output."""
    def run(*argv: str) -> Result:
        capsys.readouterr()
        rc = cli.main(list(argv))
        out = capsys.readouterr()
        return Result(rc, out.out, out.err)
    return run


@pytest.fixture
def verify(cli_run: Callable[..., Result]) -> Callable[..., Result]:
    def run(log: AuditLog, pub: Path, *extra: str) -> Result:
        return cli_run("audit", "verify", "--log", str(log.path), "--public-key", str(pub), *extra)
    return run


def sig_doc(log: AuditLog) -> dict[str, Any]:
    return json.loads(log.signature_path.read_text())


def other_key(tmp_path: Path, name: str = "other") -> tuple[Path, Path]:
    priv, pub, _ = signing.generate_keypair(tmp_path / name / "key.pem")
    return priv, pub


# ---- keygen ----------------------------------------------------------------------------------
def test_keygen_writes_a_private_0600_pair_and_refuses_to_overwrite(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "k" / "signing.pem"
    assert cli.main(["audit", "keygen", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    pub = out.with_name("signing.pem.pub")
    assert stat.S_IMODE(out.stat().st_mode) == 0o600
    assert out.read_bytes().startswith(b"-----BEGIN PRIVATE KEY-----")
    assert pub.read_bytes().startswith(b"-----BEGIN PUBLIC KEY-----")
    kid = signing.key_id(signing.load_public_key(pub, "t"))
    assert kid == Signer.from_file(out, "t").key_id and f"key id {kid}" in printed
    assert f"audit_signing_key: {out.resolve()}" in printed and f"audit_public_key: {pub.resolve()}" in printed
    before = out.read_bytes(), pub.read_bytes()
    assert cli.main(["audit", "keygen", "--out", str(out)]) == 2
    assert f"{out}: already exists; refusing to overwrite" in capsys.readouterr().err
    assert (out.read_bytes(), pub.read_bytes()) == before
    # a stray .pub alone also blocks: the new private key would not match it
    lone = tmp_path / "k" / "lone.pem"
    lone.with_name("lone.pem.pub").write_text("x")
    assert cli.main(["audit", "keygen", "--out", str(lone)]) == 2
    assert not lone.exists() and "lone.pem.pub: already exists" in capsys.readouterr().err
    assert not [p for p in out.parent.iterdir() if p.name.startswith(".")]  # no temp files left


# ---- round trip ------------------------------------------------------------------------------
def test_every_append_signs_the_new_head_and_verify_accepts_it(
    log: AuditLog, keys: tuple[Path, Path], cli_run: Callable[..., Result]
) -> None:
    head = log.head()
    assert head is not None and head.count == 5
    doc = sig_doc(log)
    assert log.signature_path == log.path.parent / "head.sig"
    assert (doc["chain_id"], doc["count"], doc["head_hash"]) == (log.chain_id(), 5, head.hash)
    assert doc["key_id"] == signing.key_id(signing.load_public_key(keys[1], "t"))
    assert log.signature_path.read_text() == canonical_json(doc) + "\n"  # one spelling, like the log
    report = log.verify(public_key=signing.load_public_key(keys[1], "t"))
    assert report.ok and report.signature is not None and report.signature.status is Status.OK
    # the real command, once as a process (its exit code is what CI scripts see)
    cmd = [sys.executable, "-m", "lmforge.cli", "audit", "verify", "--log", str(log.path), "--public-key", str(keys[1])]
    proc = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=120, cwd=log.path.parent)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0] == f"audit chain OK: 5 records, head {head.hash}"
    assert f"signature OK: {log.signature_path} covers this head, signed by {doc['key_id']}" in proc.stdout
    # without a key the chain verifies as before, and says the signature went unchecked
    plain = cli_run("audit", "verify", "--log", str(log.path), "--params", str(log.path.parent / "none.yaml"))
    assert plain.returncode == 0 and f"note: {log.signature_path} was not checked" in plain.stderr


def test_concurrent_signed_appends_leave_the_newest_head_signed(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    """Signing happens under the log's lock: a slower process can never overwrite a newer head's
    signature with its older one."""
    worker = ("import sys\nfrom lmforge.audit import AuditLog\nfrom lmforge.signing import Signer\n"
              "log = AuditLog(sys.argv[1], signer=Signer.from_file(sys.argv[2], 'test'))\n"
              "for i in range(15):\n    log.append({'stage': 'conc', 'i': i})\n")
    path = tmp_path / "audit" / "log.jsonl"
    procs = [subprocess.Popen([sys.executable, "-c", worker, str(path), str(keys[0])], env=ENV) for _ in range(4)]
    assert [p.wait(timeout=120) for p in procs] == [0] * 4
    report = AuditLog(path).verify(public_key=signing.load_public_key(keys[1], "t"))
    assert report.ok and report.count == 61, report.problem


# ---- each failure mode, each with its own exit code -------------------------------------------
def test_no_signature_file_is_exit_4(tmp_path: Path, keys: tuple[Path, Path], verify: Callable[..., Result]) -> None:
    log = AuditLog(tmp_path / "audit" / "log.jsonl")
    log.append(body(0))
    proc = verify(log, keys[1])
    assert proc.returncode == Status.UNSIGNED == 4
    assert "audit chain OK: 2 records" in proc.stdout  # the chain itself is fine
    assert f"audit signature MISSING: {log.signature_path}: no signature file" in proc.stderr
    assert "pipeline.audit_signing_key" in proc.stderr and "lmforge audit sign" in proc.stderr


@pytest.mark.parametrize("field", ["count", "head_hash", "signed_at", "signature"])
def test_an_edited_signature_file_is_exit_5(log: AuditLog, keys: tuple[Path, Path], field: str, verify: Callable[..., Result]) -> None:
    doc = sig_doc(log)
    if field == "count":
        doc["count"] -= 1  # e.g. to pass off records as appended after signing
    elif field == "head_hash":
        doc["head_hash"] = sha256_json("forged")
    elif field == "signed_at":
        doc["signed_at"] = "2020-01-01T00:00:00Z"
    else:
        raw = bytearray(base64.b64decode(doc["signature"]))
        raw[0] ^= 1
        doc["signature"] = base64.b64encode(bytes(raw)).decode()
    log.signature_path.write_text(canonical_json(doc) + "\n")
    proc = verify(log, keys[1])
    assert proc.returncode == Status.BAD_SIGNATURE == 5, proc.stderr
    assert f"audit signature BAD: {log.signature_path}: the signature does not match its contents" in proc.stderr


@pytest.mark.parametrize("content", [b"not json", b"[]", b'{"format": "lmforge-audit-sig/1"}'])
def test_a_garbled_signature_file_is_exit_5(log: AuditLog, keys: tuple[Path, Path], content: bytes, verify: Callable[..., Result]) -> None:
    log.signature_path.write_bytes(content)
    proc = verify(log, keys[1])
    assert proc.returncode == 5 and f"audit signature BAD: {log.signature_path}: " in proc.stderr


def test_a_signature_of_another_chain_is_exit_5(log: AuditLog, keys: tuple[Path, Path], tmp_path: Path, verify: Callable[..., Result]) -> None:
    other = AuditLog(tmp_path / "elsewhere" / "log.jsonl", signer=Signer.from_file(keys[0], "t"))
    for i in range(4):
        other.append(body(i))
    log.signature_path.write_bytes(other.signature_path.read_bytes())
    proc = verify(log, keys[1])
    assert proc.returncode == 5 and "belongs to another log" in proc.stderr


def test_records_appended_without_the_key_are_exit_6_until_signed(log: AuditLog, keys: tuple[Path, Path], verify: Callable[..., Result]) -> None:
    """Someone without the key appends (through lmforge, so the chain and head agree)."""
    intruder = AuditLog(log.path)
    intruder.append(body(98))
    intruder.append(body(99))
    assert intruder.verify().ok  # the hash chain alone cannot tell
    proc = verify(log, keys[1])
    assert proc.returncode == Status.STALE == 6, proc.stderr
    assert "audit chain OK: 7 records" in proc.stdout
    assert "audit signature STALE (older head): " in proc.stderr
    assert "(record count 5, " in proc.stderr and "records 5..6 were appended after it without the signing key" in proc.stderr
    assert "lmforge audit show --last 2" in proc.stderr
    # the key holder checked them: `lmforge audit sign` signs the current head
    assert cli.main(["audit", "sign", "--log", str(log.path), "--key", str(keys[0])]) == 0
    assert sig_doc(log)["count"] == 7 and verify(log, keys[1]).returncode == 0


def test_another_key_is_exit_7(log: AuditLog, keys: tuple[Path, Path], tmp_path: Path, verify: Callable[..., Result]) -> None:
    _, wrong_pub = other_key(tmp_path)
    proc = verify(log, wrong_pub)
    assert proc.returncode == Status.WRONG_KEY == 7
    assert f"signed by key {sig_doc(log)['key_id']}, but the trusted public key is " in proc.stderr
    # an attacker extends the chain and re-signs with their own key: still caught
    attacker, _ = other_key(tmp_path, "attacker")
    forged = AuditLog(log.path, signer=Signer.from_file(attacker, "t"))
    forged.append(body(99))
    assert verify(log, keys[1]).returncode == 7


def test_a_rewritten_chain_with_a_matching_head_is_caught_only_by_the_signature(
    log: AuditLog, keys: tuple[Path, Path], verify: Callable[..., Result]
) -> None:
    """Cut the last record and rewrite head.json to match: a self-consistent chain, so the hash
    chain alone verifies; the signed head is no longer in it (exit 1, as a broken chain)."""
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"".join(lines[:-1]))
    last = json.loads(lines[-2])
    log.head_path.write_text(canonical_json({"count": 4, "hash": last["hash"], "updated": "x"}) + "\n")
    assert AuditLog(log.path).verify().ok
    proc = verify(log, keys[1])
    assert proc.returncode == 1
    assert "audit chain BROKEN: " in proc.stderr and "audit chain OK" not in proc.stdout
    assert "(record count 5, " in proc.stderr and "the chain was cut off or rewritten after it was signed" in proc.stderr


def test_a_head_edited_alone_is_a_broken_chain(log: AuditLog, keys: tuple[Path, Path], verify: Callable[..., Result]) -> None:
    head = json.loads(log.head_path.read_text())
    log.head_path.write_text(canonical_json({**head, "count": 4}) + "\n")
    proc = verify(log, keys[1])
    assert proc.returncode == 1 and "audit chain BROKEN" in proc.stderr


def test_sign_refuses_a_chain_that_does_not_verify(log: AuditLog, keys: tuple[Path, Path],
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    lines = log.path.read_bytes().splitlines(keepends=True)
    log.path.write_bytes(b"".join(lines[:-1]))
    before = log.signature_path.read_bytes()
    assert cli.main(["audit", "sign", "--log", str(log.path), "--key", str(keys[0])]) == 2
    assert "refusing to sign a chain that does not verify" in capsys.readouterr().err
    assert log.signature_path.read_bytes() == before


# ---- bad key files ---------------------------------------------------------------------------
def _pem(key: Any) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


BAD_PRIVATE = {
    "missing": (None, "private key not found"),
    "not_pem": (b"just some text\n", "not a PEM file"),
    "public_key": ("pub", "not a PEM private key (it is a public key: the private key is the file without .pub)"),
    "rsa": ("rsa", "holds an RSAPrivateKey; audit signatures are Ed25519"),
    "encrypted": ("enc", "the private key is encrypted"),
    "garbled_pem": (b"-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n", "not a readable PEM private key"),
    "world_readable": ("0644", "private key is readable by other users (mode 0644;"),
}


def _repo(tmp_path: Path, **pipeline: str) -> Path:
    repo = tmp_path / "repo"
    repo.mkdir(exist_ok=True)
    (repo / "params.yaml").write_text(yaml.safe_dump({"pipeline": pipeline}))
    return repo


@pytest.mark.parametrize("kind", list(BAD_PRIVATE))
def test_a_bad_signing_key_names_the_file_and_the_params_key(tmp_path: Path, keys: tuple[Path, Path], kind: str) -> None:
    content, phrase = BAD_PRIVATE[kind]
    path = tmp_path / "bad.pem"
    if content == "pub":
        content = keys[1].read_bytes()
    elif content == "rsa":
        content = _pem(rsa.generate_private_key(65537, 1024))
    elif content == "enc":
        content = ed25519.Ed25519PrivateKey.generate().private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"))
    elif content == "0644":
        content = keys[0].read_bytes()
    if content is not None:
        path.write_bytes(content)
        path.chmod(0o644 if kind == "world_readable" else 0o600)
    repo = _repo(tmp_path, audit_signing_key=str(path))
    with pytest.raises(ConfigError) as err:
        dag.audit_log(repo)
    assert str(err.value).startswith(f"{path}: ") and phrase in str(err.value)
    assert "params.yaml: pipeline.audit_signing_key" in str(err.value)


def test_a_public_key_that_is_not_the_signing_keys_half_is_refused(tmp_path: Path, keys: tuple[Path, Path]) -> None:
    _, wrong_pub = other_key(tmp_path)
    repo = _repo(tmp_path, audit_signing_key=str(keys[0]), audit_public_key=str(wrong_pub))
    with pytest.raises(ConfigError, match="pipeline.audit_public_key .* is not the public half of"):
        dag.audit_log(repo)
    # the right pair, relative to the repo root, signs
    (repo / "k").mkdir()
    for p in keys:
        (repo / "k" / p.name).write_bytes(p.read_bytes())
        (repo / "k" / p.name).chmod(0o600)
    repo = _repo(tmp_path, audit_signing_key="k/audit.pem", audit_public_key="k/audit.pem.pub")
    log = dag.audit_log(repo)
    assert log.signer is not None and log.path == repo / "audit/log.jsonl"


def test_verify_refuses_a_private_key_as_public_key(log: AuditLog, keys: tuple[Path, Path], verify: Callable[..., Result]) -> None:
    proc = verify(log, keys[0])
    assert proc.returncode == 2
    assert f"{keys[0]}: is a private key; --public-key takes the public key" in proc.stderr


@pytest.mark.parametrize(("value", "phrase"), [
    (3, "Input should be a valid string"),
    (" k.pem", "has leading or trailing spaces"),
    ("keys/", "is a directory"),
])
def test_pipeline_config_checks_the_key_params(tmp_path: Path, value: object, phrase: str) -> None:
    (tmp_path / "params.yaml").write_text(yaml.safe_dump({"pipeline": {"audit_signing_key": value}}))
    with pytest.raises(ConfigError) as err:
        dag.pipeline_config(tmp_path)
    assert "params.yaml: pipeline.audit_signing_key" in str(err.value) and phrase in str(err.value)


def test_unset_keys_leave_the_chain_unsigned(tmp_path: Path) -> None:
    repo = _repo(tmp_path)
    assert dag.pipeline_config(repo).audit_signing_key == ""
    log = dag.audit_log(repo)
    log.append(body(0))
    assert log.signer is None and not log.signature_path.exists()


def test_verify_takes_the_public_key_from_params(
    log: AuditLog, keys: tuple[Path, Path], tmp_path: Path, cli_run: Callable[..., Result],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Run where params.yaml names the key (the signing host, or an auditor's clone)."""
    repo = log.path.parent.parent
    monkeypatch.chdir(repo)
    (repo / "params.yaml").write_text(yaml.safe_dump({"pipeline": {"audit_public_key": str(keys[1])}}))
    proc = cli_run("audit", "verify")
    assert proc.returncode == 0 and f"(trusted key: {keys[1]})" in proc.stdout, proc.stderr
    # only the private key configured: its public half is used
    (repo / "params.yaml").write_text(yaml.safe_dump({"pipeline": {"audit_signing_key": str(keys[0])}}))
    proc = cli_run("audit", "verify")
    assert proc.returncode == 0 and f"(trusted key: the public half of {keys[0]})" in proc.stdout, proc.stderr
    # a configured key makes the signature required
    _, wrong_pub = other_key(tmp_path)
    (repo / "params.yaml").write_text(yaml.safe_dump({"pipeline": {"audit_public_key": str(wrong_pub)}}))
    assert cli_run("audit", "verify").returncode == 7
    # --public-key wins over params
    proc = cli_run("audit", "verify", "--public-key", str(keys[1]))
    assert proc.returncode == 0, proc.stderr
    # a relative key path is taken from the repo root, as the stages take it
    (repo / "params.yaml").write_text(yaml.safe_dump({"pipeline": {"audit_public_key": "k.pub"}}))
    (repo / "k.pub").write_bytes(keys[1].read_bytes())
    assert cli_run("audit", "verify", "--params", str(repo / "params.yaml")).returncode == 0
    # a bad key file named in params fails with the params key in the message
    (repo / "k.pub").write_text("nope")
    proc = cli_run("audit", "verify")
    assert proc.returncode == 2 and "k.pub: not a PEM file (set by params.yaml: pipeline.audit_public_key" in proc.stderr


# ---- the writers: flow and stage wrapper -----------------------------------------------------
def test_the_flows_stage_remote_record_is_signed(tmp_path: Path, keys: tuple[Path, Path],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    from pipelines import flow
    from pipelines.graph import PlannedStage

    repo = _repo(tmp_path, audit_signing_key=str(keys[0]))
    (repo / "dvc.yaml").write_text(yaml.safe_dump({"stages": {"train": {"cmd": "true", "outs": ["out.txt"]}}}))
    (repo / "out.txt").write_text("weights")
    monkeypatch.setattr(flow, "_worker_record", lambda parent, stage: None)
    flow._audit_remote_stage(PlannedStage("train", "gpu", 1, (), ()), repo, flow.UUID(int=1), "gpu", None)
    log = AuditLog(repo / "audit/log.jsonl")
    assert [r["kind"] for r in log.records()] == ["genesis", "stage.remote"]
    assert log.verify(public_key=signing.load_public_key(keys[1], "t")).ok


def test_the_stage_wrapper_signs_and_refuses_a_bad_key_before_any_work(
    tmp_path: Path, keys: tuple[Path, Path], cli_run: Callable[..., Result], monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.pipeline_repo import copy_repo, run

    repo = copy_repo(tmp_path / "repo", profile=None)
    (repo / "data/sources/good.jsonl.gz").write_bytes((ROOT / "tests/fixtures/sources/shakespeare.jsonl.gz").read_bytes())
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["mix"]["sources"] = [{"name": "s", "path": "data/sources/good.jsonl.gz", "share": 1.0, "licence": "test"}]
    params["mix"]["mixing"]["total"] = None
    params["pipeline"]["audit_signing_key"] = str(tmp_path / "missing.pem")
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bad = run(repo, "python", "-m", "stages.mix", check=False)
    assert bad.returncode == 2
    assert f"{tmp_path / 'missing.pem'}: private key not found (set by params.yaml: pipeline.audit_signing_key)" in bad.stderr
    assert not (repo / "data/mix/metrics.json").exists() and not (repo / "audit").exists()  # nothing ran or audited

    params["pipeline"]["audit_signing_key"] = str(keys[0])
    params["pipeline"]["audit_public_key"] = str(keys[1])
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(repo, "python", "-m", "stages.mix")
    doc = json.loads((repo / "audit/head.sig").read_text())
    assert doc["count"] == 2  # genesis + the mix record
    monkeypatch.chdir(repo)
    ok = cli_run("audit", "verify")  # the public key comes from params.yaml
    assert ok.returncode == 0, ok.stderr
    assert f"signature OK: audit/head.sig covers this head, signed by {doc['key_id']}" in ok.stdout
