"""The `lmforge` command. `lmforge --help` lists the subcommands; each has its own --help.

Subcommands import their module lazily so `lmforge --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import ConfigError, LmforgeError

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from .signing import Signer

_SIGNING_KEY, _PUBLIC_KEY = "audit_signing_key", "audit_public_key"


def _key_param(params: str, field: str) -> tuple[Path, str] | None:
    """params.yaml's `pipeline.<field>` as (path, where), resolved like the stages resolve it
    (`~` expanded, relative to the repo root); None when there is no params file or it is unset."""
    from .config import read_yaml
    from .signing import resolve

    path = Path(params)
    if not path.is_file():
        return None
    pipe = read_yaml(path).get("pipeline") or {}
    value = pipe.get(field, "") if isinstance(pipe, dict) else ""
    where = f"{path}: pipeline.{field}"
    if not isinstance(value, str):
        raise ConfigError(f"{where}: must be a path (a string), got {value!r}")
    return (resolve(value, path.parent), where) if value.strip() else None


def _trusted_key(args: argparse.Namespace) -> tuple[Ed25519PublicKey, str] | None:
    """The public key `audit verify` checks the head's signature with, and where it came from:
    --public-key; else params.yaml's pipeline.audit_public_key; else the public half of
    pipeline.audit_signing_key (the signing host itself). None: the signature is not checked."""
    from .signing import Signer, load_public_key

    if args.public_key:
        return load_public_key(args.public_key, "--public-key"), args.public_key
    if (pub := _key_param(args.params, _PUBLIC_KEY)) is not None:
        return load_public_key(*pub), str(pub[0])
    if (priv := _key_param(args.params, _SIGNING_KEY)) is not None:
        return Signer.from_file(*priv).public_key, f"the public half of {priv[0]}"
    return None


def _signer(args: argparse.Namespace) -> Signer:
    from .signing import Signer

    if args.key:
        return Signer.from_file(args.key, "--key")
    if (priv := _key_param(args.params, _SIGNING_KEY)) is not None:
        return Signer.from_file(*priv)
    raise ConfigError(f"no signing key: pass --key PATH, or set {args.params}: pipeline.{_SIGNING_KEY} "
                      "(make a key pair with `lmforge audit keygen --out PATH`)")


def _cmd_audit_sign(args: argparse.Namespace) -> int:
    from . import audit

    return audit.cli_sign(args, _signer(args))


def _cmd_audit_keygen(args: argparse.Namespace) -> int:
    from . import signing

    return signing.cli_keygen(args)


def _cmd_audit_verify(args: argparse.Namespace) -> int:
    from . import audit

    if args.mlflow:
        from . import tracking

        chain = audit.AuditLog(args.log, args.head).chain_id()
        anchor = tracking.latest_audit_anchor(".", chain, args.mlflow_experiment) if chain else None
        if anchor is None:
            print(f"lmforge: error: no MLflow anchor for the audit chain in {args.log} (chain {chain}) in "
                  f"experiment '{args.mlflow_experiment}' of the store (MLFLOW_TRACKING_URI or ./mlflow.db)",
                  file=sys.stderr)
            return 1
        args.expect_count, args.expect_hash = anchor
    trusted = _trusted_key(args)
    return audit.cli_verify(args, *(trusted or (None, "")))


def _cmd_audit_show(args: argparse.Namespace) -> int:
    from . import audit

    return audit.cli_show(args)


def _cmd_audit_recover(args: argparse.Namespace) -> int:
    from . import audit

    print(audit.AuditLog(args.log, args.head).recover())
    return 0


def _cmd_dedup(args: argparse.Namespace) -> int:
    from .data import dedup

    return dedup.cli_dedup(args)


def _cmd_generate(args: argparse.Namespace) -> int:
    from . import engine

    return engine.cli_generate(args)


def _cmd_profile_apply(args: argparse.Namespace) -> int:
    from . import profiles

    return profiles.cli_apply(args)


def build_parser() -> argparse.ArgumentParser:
    from .chat_cli import add_parser as add_chat
    from .engine import add_sampling_args
    from .forge.cli import add_parser as add_forge
    from .serve import add_parser as add_serve

    p = argparse.ArgumentParser(
        prog="lmforge",
        description="Raw text to a released language model through one reproducible, auditable DAG. "
        "Run the pipeline with `dvc repro` (or `make run`); these commands inspect and operate on it.",
    )
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    a = sub.add_parser("audit", help="inspect and verify the hash-chained audit log")
    asub = a.add_subparsers(dest="audit_command", required=True, metavar="ACTION")
    v = asub.add_parser(
        "verify", help="exit 0 on an intact chain (and a good signature), non-zero naming the first bad record",
        description="Check the hash chain against its head anchor and, when a public key is given "
        "(--public-key, or params.yaml's pipeline.audit_public_key / audit_signing_key), the head's "
        "Ed25519 signature. Exit codes: 0 intact; 1 chain broken (or cut/rewritten after signing); "
        "2 usage or key-file error; 4 no signature file; 5 bad signature (the file was edited); "
        "6 signature for an older head (records appended after signing); 7 signed by another key.",
    )
    v.add_argument("--log", default="audit/log.jsonl", help="audit log path (default: %(default)s)")
    v.add_argument("--head", default=None, help="head anchor file (default: <log dir>/head.json)")
    v.add_argument("--expect-hash", default=None, help="also require this head hash (an external anchor)")
    v.add_argument("--expect-count", type=int, default=None, help="also require this record count")
    v.add_argument("--mlflow", action="store_true",
                   help="also require the newest head anchored on the MLflow runs (MLFLOW_TRACKING_URI "
                   "or sqlite:///mlflow.db)")
    v.add_argument("--mlflow-experiment", default="lmforge", help="experiment holding the anchors")
    v.add_argument("--public-key", default=None, metavar="PATH",
                   help="trusted Ed25519 public key (PEM, from `lmforge audit keygen`); also require the "
                   "head's signature (<head dir>/head.sig) to be valid, by this key, for the current head")
    v.add_argument("--params", default="params.yaml",
                   help="where to find pipeline.audit_public_key when --public-key is not given "
                   "(default: %(default)s; ignored if absent)")
    v.set_defaults(func=_cmd_audit_verify)
    sg = asub.add_parser("sign", help="sign the current head after verifying the chain (writes <head dir>/head.sig)")
    sg.add_argument("--log", default="audit/log.jsonl", help="audit log path (default: %(default)s)")
    sg.add_argument("--head", default=None, help="head anchor file (default: <log dir>/head.json)")
    sg.add_argument("--key", default=None, metavar="PATH",
                    help="Ed25519 private key (default: params.yaml's pipeline.audit_signing_key)")
    sg.add_argument("--params", default="params.yaml", help="params file to read the key path from")
    sg.set_defaults(func=_cmd_audit_sign)
    kg = asub.add_parser("keygen", help="write a new Ed25519 key pair for signing the audit head")
    kg.add_argument("--out", required=True, metavar="PATH",
                    help="private key path (PEM, mode 0600; keep it outside the repo); the public key goes "
                    "to PATH.pub. Refuses to overwrite either.")
    kg.set_defaults(func=_cmd_audit_keygen)
    s = asub.add_parser("show", help="print the chain readably")
    s.add_argument("--log", default="audit/log.jsonl", help="audit log path (default: %(default)s)")
    s.add_argument("--last", type=int, default=None, help="only the last N records")
    s.add_argument("--stage", default=None, help="only records of this stage")
    s.add_argument("--json", action="store_true", help="print the raw canonical records")
    s.add_argument("--head", default=None, help="head anchor file (default: <log dir>/head.json)")
    s.set_defaults(func=_cmd_audit_show)
    r = asub.add_parser("recover", help="finish an append interrupted by a crash (refuses anything else)")
    r.add_argument("--log", default="audit/log.jsonl", help="audit log path (default: %(default)s)")
    r.add_argument("--head", default=None, help="head anchor file (default: <log dir>/head.json)")
    r.set_defaults(func=_cmd_audit_recover)

    d = sub.add_parser("dedup", help="near-duplicate removal (MinHash LSH) on a jsonl file with a `text` field")
    d.add_argument("--input", required=True, help="input .jsonl (each line an object with a string `text`)")
    d.add_argument("--output", required=True, help="output .jsonl: kept records, unchanged")
    d.add_argument("--threshold", type=float, default=0.8, help="Jaccard threshold (default: %(default)s)")
    d.add_argument("--num-perm", type=int, default=128, help="MinHash permutations (default: %(default)s)")
    d.add_argument("--ngram", type=int, default=3, help="word shingle size (default: %(default)s)")
    d.add_argument("--seed", type=int, default=42, help="hash seed (default: %(default)s)")
    d.set_defaults(func=_cmd_dedup)

    g = sub.add_parser("generate", help="sample a continuation of a prompt from a model directory")
    g.add_argument("--model", required=True, help="model directory (data/pretrain/model) or an export (data/export/hf)")
    g.add_argument("--prompt", required=True, help="text to continue (encoded after <|bos|>)")
    g.add_argument("--max-new-tokens", type=int, default=64, help="most tokens per sample (default: %(default)s)")
    g.add_argument("--greedy", action="store_true", help="always take the most likely token (temperature 0)")
    g.add_argument("--num-samples", type=int, default=1, help="continuations to print (default: %(default)s)")
    add_sampling_args(g, temperature=1.0, top_k=None)
    g.set_defaults(func=_cmd_generate)

    add_chat(sub)
    add_forge(sub)
    add_serve(sub)

    pr = sub.add_parser("profile", help="apply a profile (profiles/<name>.yaml) onto params.yaml")
    psub = pr.add_subparsers(dest="profile_command", required=True, metavar="ACTION")
    pa = psub.add_parser("apply", help="deep-merge a profile's overrides into params.yaml (atomically)")
    pa.add_argument("profile", help="a name in profiles/ (e.g. ci) or a path to a YAML file")
    pa.add_argument("--params", default="params.yaml", help="params file to rewrite (default: %(default)s)")
    pa.add_argument("--profiles-dir", default="profiles", help="where named profiles live")
    pa.set_defaults(func=_cmd_profile_apply)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except LmforgeError as e:
        print(f"lmforge: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
