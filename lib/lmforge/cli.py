"""The `lmforge` command. `lmforge --help` lists the subcommands; each has its own --help.

Subcommands import their module lazily so `lmforge --help` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from .errors import LmforgeError


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
    return audit.cli_verify(args)


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
    v = asub.add_parser("verify", help="exit 0 on an intact chain, non-zero naming the first bad record")
    v.add_argument("--log", default="audit/log.jsonl", help="audit log path (default: %(default)s)")
    v.add_argument("--head", default=None, help="head anchor file (default: <log dir>/head.json)")
    v.add_argument("--expect-hash", default=None, help="also require this head hash (an external anchor)")
    v.add_argument("--expect-count", type=int, default=None, help="also require this record count")
    v.add_argument("--mlflow", action="store_true",
                   help="also require the newest head anchored on the MLflow runs (MLFLOW_TRACKING_URI "
                   "or sqlite:///mlflow.db)")
    v.add_argument("--mlflow-experiment", default="lmforge", help="experiment holding the anchors")
    v.set_defaults(func=_cmd_audit_verify)
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
