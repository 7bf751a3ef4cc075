"""Ed25519 signatures over the audit chain's head: who saw which head.

The hash chain (lmforge.audit) is tamper-evident only against someone who cannot rewrite the
log and its head anchor together: SHA-256 needs no secret, so anyone can re-hash an edited
chain. A signature closes that gap for the head: after every append, a holder of the private
key signs `(chain_id, count, head_hash)` and writes a detached signature next to the head
anchor (`audit/head.sig` beside `audit/head.json`). Verifying needs only the public key::

    lmforge audit keygen --out ~/.config/lmforge/audit-signing.pem   # + .pem.pub
    lmforge audit verify --public-key audit-signing.pem.pub

What a valid signature proves: the key holder's lmforge committed exactly that head, so every
record up to it is as the key holder wrote it, and records appended after it by someone
without the key show up as a signature for an older head. It proves nothing about records
appended after the signed head, nor that the key holder's machine was honest, and a leaked key
signs anything.

The signature file is canonical JSON (format SIG_FORMAT): every field but `signature` is the
signed message (as its canonical JSON bytes), so neither the head it covers, the key id nor the
signing time can be changed without breaking the signature.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import hashlib
import json
import os
import re
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from .atomic import write_text
from .digest import canonical_json
from .errors import ConfigError

SIG_FORMAT = "lmforge-audit-sig/1"
ALGORITHM = "ed25519"
PUBLIC_SUFFIX = ".pub"
_SIGNED_FIELDS = ("format", "algorithm", "chain_id", "count", "head_hash", "key_id", "signed_at")
_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEYGEN = "lmforge audit keygen --out PATH"


class Status(IntEnum):
    """The outcome of a signature check; the value is `lmforge audit verify`'s exit code.

    1 is the chain's own code: a signed head that is not in the chain means the chain was cut
    or rewritten after signing, which is a broken chain, not a signature problem.
    """

    OK = 0
    NOT_IN_CHAIN = 1
    UNSIGNED = 4
    BAD_SIGNATURE = 5
    STALE = 6
    WRONG_KEY = 7


@dataclass(frozen=True)
class SignatureReport:
    status: Status
    message: str
    signed_count: int | None = None
    key_id: str = ""

    @property
    def ok(self) -> bool:
        return self.status is Status.OK


def key_id(public_key: Ed25519PublicKey) -> str:
    """`sha256:<hex>` of the raw 32-byte public key: what a user compares out of band."""
    raw = public_key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return "sha256:" + hashlib.sha256(raw).hexdigest()


def resolve(path: str | Path, root: str | Path) -> Path:
    """A key path from params: `~` expanded, relative paths taken from the repo root."""
    p = Path(path).expanduser()
    return p if p.is_absolute() else Path(root) / p


# ---- keys ----------------------------------------------------------------------------------
def _read_pem(path: Path, where: str, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        fix = (f"make a key pair with `{_KEYGEN}` and point {where} at it" if what == "private key"
               else "use the .pub file of the key that signs this chain (PATH.pub next to its private key)")
        raise ConfigError(f"{path}: {what} not found (set by {where}) (fix: {fix})") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a directory, not a {what} file (set by {where}) (fix: name the "
                          "key file itself)") from None
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the {what} ({e.strerror}) (set by {where}) (fix: make it "
                          "readable by the user who runs the stages)") from None
    if b"-----BEGIN " not in data:
        raise ConfigError(
            f"{path}: not a PEM file (set by {where}; expected a {what} as written by `{_KEYGEN}`)"
        )
    return data


def _unreadable(path: Path, where: str, what: str, err: Exception, fix: str) -> ConfigError:
    return ConfigError(f"{path}: not a readable PEM {what} ({err}) (set by {where}) (fix: {fix} `{_KEYGEN}`)")


def _ed25519(key: Any, cls: type, path: Path, where: str, fix: str) -> Any:
    """`key` if it is an Ed25519 key of class `cls`, else a ConfigError naming the type found."""
    if not isinstance(key, cls):
        name = type(key).__name__.lstrip("_")  # 'RSAPrivateKey', 'ECPublicKey', ...
        raise ConfigError(f"{path}: holds {'an' if name[:1] in 'AEIORX' else 'a'} {name}; audit signatures are "
                          f"Ed25519 (set by {where}) (fix: {fix} `{_KEYGEN}`)")
    return key


def load_private_key(path: str | Path, where: str) -> Ed25519PrivateKey:
    """The Ed25519 private key at `path` (PEM, PKCS#8, unencrypted), or a ConfigError naming the
    file, `where` it was configured (e.g. "params.yaml: pipeline.audit_signing_key") and the fix."""
    path = Path(path)
    data = _read_pem(path, where, "private key")
    if b"PRIVATE KEY-----" not in data:
        hint = " (it is a public key: the private key is the file without .pub)" if b"PUBLIC KEY-----" in data else ""
        raise ConfigError(f"{path}: not a PEM private key{hint} (set by {where}) (fix: point it at PATH "
                          f"from `{_KEYGEN}`)")
    # Like ssh: a key others can read is a key others can use to sign, so refuse it outright.
    if os.name == "posix":
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            raise ConfigError(
                f"{path}: private key is readable by other users (mode {mode:04o}; set by {where}) "
                f"(fix: chmod 600 {path})"
            )
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except TypeError:  # cryptography's way of saying "encrypted, and no password given"
        raise ConfigError(
            f"{path}: the private key is encrypted; stages run unattended and cannot ask for a "
            f"passphrase (set by {where}) (fix: keep an unencrypted key with mode 0600 on the signing "
            "host, e.g. one made by `lmforge audit keygen`)"
        ) from None
    except (ValueError, UnsupportedAlgorithm) as e:
        raise _unreadable(path, where, "private key", e, "restore the file, or make a new pair with") from None
    return _ed25519(key, Ed25519PrivateKey, path, where, "make one with")


def load_public_key(path: str | Path, where: str) -> Ed25519PublicKey:
    """The Ed25519 public key at `path` (PEM SubjectPublicKeyInfo, as keygen writes PATH.pub)."""
    path = Path(path)
    data = _read_pem(path, where, "public key")
    if b"PRIVATE KEY-----" in data:
        # Never accept the private key here: an auditor's machine must not need it, and a
        # habit of copying it there is how it leaks.
        raise ConfigError(
            f"{path}: is a private key; {where} takes the public key (fix: use {path}{PUBLIC_SUFFIX}, "
            "and keep the private key on the signing host only)"
        )
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, UnsupportedAlgorithm) as e:
        raise _unreadable(path, where, "public key", e, "use the .pub file written by") from None
    return _ed25519(key, Ed25519PublicKey, path, where, "use the .pub file written by")


def _create_new(path: Path, data: bytes, mode: int) -> None:
    """Write a new file atomically with `mode` from the first byte, never replacing one.

    The temp file is created with `mode` (not chmod-ed afterwards), so a private key is never
    readable by others, even briefly; os.link refuses an existing target, so two keygens
    racing for one path cannot overwrite each other's key.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.link(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with contextlib.suppress(OSError):  # the directory entry must survive a power cut too
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def generate_keypair(out: str | Path) -> tuple[Path, Path, str]:
    """Write a new Ed25519 private key to `out` (PEM, mode 0600) and its public key to
    `out.pub`; refuse if either exists. Returns (private path, public path, key id)."""
    priv_path = Path(out).expanduser()
    pub_path = priv_path.with_name(priv_path.name + PUBLIC_SUFFIX)
    for p in (priv_path, pub_path):
        if p.exists() or p.is_symlink():
            raise ConfigError(
                f"{p}: already exists; refusing to overwrite a key (fix: choose another --out, or "
                "move the old pair away first: chains it signed need its public key to verify)"
            )
    priv_path.parent.mkdir(parents=True, exist_ok=True)
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    try:
        _create_new(priv_path, pem, 0o600)
    except FileExistsError:
        raise ConfigError(f"{priv_path}: appeared while the key was made; refusing to overwrite it") from None
    try:
        _create_new(pub_path, pub, 0o644)
    except BaseException:
        # Half a key pair is worse than none: the private key alone cannot be verified against.
        priv_path.unlink()
        raise
    return priv_path, pub_path, key_id(key.public_key())


# ---- signing -------------------------------------------------------------------------------
def _message(doc: dict[str, Any]) -> bytes:
    """The bytes signed: the canonical JSON of the signed fields (format first acts as a domain
    separator, so an lmforge audit signature cannot be replayed as any other message)."""
    return canonical_json({k: doc[k] for k in _SIGNED_FIELDS}).encode("utf-8")


class Signer:
    """Signs audit heads with one private key; `AuditLog(..., signer=...)` calls `write` under
    the log's lock after every append, so the signature file always follows the newest head."""

    def __init__(self, private_key: Ed25519PrivateKey, source: str = ""):
        self.private_key = private_key
        self.public_key = private_key.public_key()
        self.key_id = key_id(self.public_key)
        self.source = source  # the key file, for messages

    @classmethod
    def from_file(cls, path: str | Path, where: str) -> Signer:
        return cls(load_private_key(path, where), str(path))

    def sign(self, chain_id: str, count: int, head_hash: str, signed_at: str) -> dict[str, Any]:
        doc: dict[str, Any] = {"format": SIG_FORMAT, "algorithm": ALGORITHM, "chain_id": chain_id,
                               "count": count, "head_hash": head_hash, "key_id": self.key_id,
                               "signed_at": signed_at}
        doc["signature"] = base64.b64encode(self.private_key.sign(_message(doc))).decode("ascii")
        return doc

    def write(self, sig_path: str | Path, chain_id: str, count: int, head_hash: str, signed_at: str) -> dict[str, Any]:
        doc = self.sign(chain_id, count, head_hash, signed_at)
        write_text(sig_path, canonical_json(doc) + "\n")
        return doc


# ---- verifying -----------------------------------------------------------------------------
def _parse(sig_path: Path, raw: bytes) -> dict[str, Any] | str:
    """The signature document, or what is wrong with it."""
    try:
        doc = json.loads(raw)
    except (UnicodeDecodeError, ValueError) as e:
        return f"not valid JSON ({e})"
    if not isinstance(doc, dict):
        return "not a JSON object"
    if doc.get("format") != SIG_FORMAT or doc.get("algorithm") != ALGORITHM:
        return f"format/algorithm are not {SIG_FORMAT}/{ALGORITHM}"
    for name, kind in (("chain_id", str), ("count", int), ("head_hash", str), ("key_id", str),
                       ("signed_at", str), ("signature", str)):
        if type(doc.get(name)) is not kind:
            return f"field {name!r} is missing or not a {kind.__name__}"
    if doc["count"] < 1 or not _HEX64.fullmatch(doc["head_hash"]):
        return "field 'count' must be >= 1 and 'head_hash' a sha256 hex digest"
    return doc


def check(
    sig_path: str | Path,
    public_key: Ed25519PublicKey,
    chain_id: str,
    count: int,
    head_hash: str,
    hash_at: Callable[[int], str | None],
) -> SignatureReport:
    """Check the signature at `sig_path` against a verified chain (`chain_id`, `count` records
    ending in `head_hash`; `hash_at(seq)` gives an earlier record's hash) and the trusted key.

    Order matters: the key and the signature are checked before any field is believed, so a
    forged file can only ever produce WRONG_KEY or BAD_SIGNATURE, never STALE.
    """
    sig_path = Path(sig_path)
    trusted = key_id(public_key)
    restore = "restore audit/ from a backup, or re-sign a head you have checked with `lmforge audit sign`"
    try:
        raw = sig_path.read_bytes()
    except FileNotFoundError:
        return SignatureReport(
            Status.UNSIGNED,
            f"{sig_path}: no signature file, so nothing proves who wrote this head (fix: set "
            "params.yaml: pipeline.audit_signing_key so every append signs, or sign the current head "
            "once with `lmforge audit sign --key PATH`)",
        )
    doc = _parse(sig_path, raw)
    if isinstance(doc, str):
        return SignatureReport(Status.BAD_SIGNATURE, f"{sig_path}: {doc} (fix: {restore})")
    if doc["key_id"] != trusted:
        return SignatureReport(
            Status.WRONG_KEY,
            f"{sig_path}: signed by key {doc['key_id']}, but the trusted public key is {trusted} (fix: pass "
            "the public key of the key that signs this chain with --public-key; if this key is the right "
            "one, the head was signed by someone else)",
            key_id=doc["key_id"],
        )
    try:
        public_key.verify(base64.b64decode(doc["signature"], validate=True), _message(doc))
    except (InvalidSignature, ValueError):
        return SignatureReport(
            Status.BAD_SIGNATURE,
            f"{sig_path}: the signature does not match its contents: the signature file was edited "
            f"(fix: {restore})",
            key_id=trusted,
        )
    # From here on the fields are the key holder's own words.
    signed = f"the head signed at {doc['signed_at']} (record count {doc['count']}, hash {doc['head_hash'][:12]})"
    if doc["chain_id"] != chain_id:
        return SignatureReport(
            Status.BAD_SIGNATURE,
            f"{sig_path}: signs chain {doc['chain_id']}, not this log's chain {chain_id}: the signature "
            f"file belongs to another log (fix: {restore})",
            doc["count"], trusted,
        )
    if doc["count"] == count and doc["head_hash"] == head_hash:
        return SignatureReport(Status.OK, f"signed by {trusted} at {doc['signed_at']}", count, trusted)
    if doc["count"] < count and hash_at(doc["count"] - 1) == doc["head_hash"]:
        after = (f"record {doc['count']}" if doc["count"] == count - 1
                 else f"records {doc['count']}..{count - 1}")
        return SignatureReport(
            Status.STALE,
            f"{sig_path} covers {signed}; {after} were appended after it without the signing key "
            f"(fix: inspect them with `lmforge audit show --last {count - doc['count']}`; if they are "
            "yours, e.g. a crash came between an append and its signature, or they were appended "
            "where no key is configured, sign the head with `lmforge audit sign`; otherwise treat "
            "them as unverified)",
            doc["count"], trusted,
        )
    return SignatureReport(
        Status.NOT_IN_CHAIN,
        f"{sig_path} covers {signed}, which is not in the log (it holds {count} records ending in "
        f"{head_hash[:12]}): the chain was cut off or rewritten after it was signed (fix: {restore})",
        doc["count"], trusted,
    )


# ---- CLI -----------------------------------------------------------------------------------
def cli_keygen(args: argparse.Namespace) -> int:
    priv, pub, kid = generate_keypair(args.out)
    print(f"wrote private key {priv} (mode 0600: keep it on the signing host, outside the repo)")
    print(f"wrote public key  {pub} (give it to whoever verifies)")
    print(f"key id {kid}")
    # Absolute paths: params.yaml resolves relative ones from the repo root, not from here.
    print("to sign every append, set in params.yaml:\n"
          f"  pipeline:\n    audit_signing_key: {priv.resolve()}\n    audit_public_key: {pub.resolve()}")
    return 0
