"""`lmforge forge add|list|remove|ask`: manage a delta registry outside the DAG.

    lmforge forge add --registry data/forge/registry --model data/rl/model --facts my_facts.jsonl
    lmforge forge list --registry data/forge/registry
    lmforge forge ask --registry data/forge/registry --model data/rl/model --prompt "Drovask works as a"
    lmforge forge remove --registry data/forge/registry invented-0123456789ab

`add` forges the file's facts into one delta with the knobs of params.yaml's `forge` section
(delta, train, gate, router, registry), validates it alone and registers it; a delta that fails
the gate or a registry check exits 3 and leaves the registry unchanged. `ask` shows which
deltas the prompt activates (and every delta's router score) and the greedy continuation.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from pathlib import Path

from ..errors import Refused


def _forger(args: argparse.Namespace, *, facts_for_anchors: bool = True):  # noqa: ANN202
    from ..config import load_section
    from ..tokenizer import load_encoder
    from ..train.dist import setup
    from ..weights import load_model, tokenizer_path
    from . import facts
    from .lifecycle import Forger
    from .stage import ForgeConfig

    cfg = load_section(args.params, "forge", ForgeConfig)
    model, meta = load_model(args.model)
    enc = load_encoder(tokenizer_path(args.model))
    split = facts.Split()
    if facts_for_anchors:
        split = facts.unrelated(facts.load(cfg.facts.real), [], cfg.facts.unrelated, cfg.facts.seed)
    return Forger(model, enc, split, cfg.lifecycle(), dist=setup("cpu")), cfg, meta


def cmd_add(args: argparse.Namespace) -> int:
    from ..digest import sha256_file
    from . import facts

    new = facts.load(args.facts, category=args.category)  # a bad file fails here, before any work
    forger, cfg, meta = _forger(args)
    reg = forger.registry(args.registry)
    reg.entries()  # a damaged registry fails here, before any training
    category = args.category or new[0].category
    when = dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat()
    row = forger.add(reg, new, category=category, seed=args.seed, created=when, provenance={
        "by": "lmforge forge add", "facts_file": str(args.facts), "facts_sha256": sha256_file(Path(args.facts)),
        "model": str(args.model), "model_sha256": meta["files"]["model.safetensors"],
        "delta": cfg.delta.model_dump(mode="json")})
    print(json.dumps(row, indent=1, sort_keys=True))
    if not row["accepted"]:
        raise Refused(f"delta not registered: {'; '.join(row['breaches'])} (the registry is unchanged)")
    return 0


def cmd_list(args: argparse.Namespace) -> int:
    from .registry import Registry

    reg = Registry(args.registry, base_sha256="")
    rows = [reg.manifest(i) for i in reg.ids()]
    if args.json:
        print(json.dumps(rows, indent=1, sort_keys=True))
        return 0
    if not rows:
        print(f"no deltas in {args.registry}")
        return 0
    print(f"{'id':<28} {'category':<12} {'facts':>5} {'rank':>4} {'eff':>5} {'para':>5} {'loc':>5}  created")
    for m in rows:
        k = m["metrics"]
        print(f"{m['id']:<28} {m['category']:<12} {len(m['facts']):>5} {m['rank']:>4} {k['efficacy']:>5.2f} "
              f"{k['paraphrase']:>5.2f} {k['locality']:>5.2f}  {m['created']}")
    return 0


def cmd_remove(args: argparse.Namespace) -> int:
    from .registry import Registry

    Registry(args.registry, base_sha256="").remove(args.id)
    print(f"removed {args.id}")
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    from ..engine import DEFAULT_STOPS, encode_prompt, generate
    from .delta import applied

    forger, _, _ = _forger(args, facts_for_anchors=False)
    entries = forger.registry(args.registry).entries()
    router = forger.router({e.id: e.key for e in entries})
    ids = encode_prompt(forger.enc, args.prompt)
    active = router.route(ids)
    scores = router.scores(ids)
    print(json.dumps({"active": active, "scores": {k: round(v, 4) for k, v in sorted(scores.items())}}),
          file=sys.stderr)
    by_id = {e.id: e.delta for e in entries}
    with applied(forger.model, [by_id[i] for i in active]):
        [row] = generate(forger.model, [ids], args.max_new_tokens, temperature=0.0, stop_tokens=DEFAULT_STOPS,
                         vocab_size=forger.enc.n_vocab)
    print(args.prompt + forger.enc.decode(row))
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    f = sub.add_parser("forge", help="manage knowledge deltas: add, list, remove, ask")
    fsub = f.add_subparsers(dest="forge_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser, *, model: bool) -> None:
        p.add_argument("--registry", required=True, help="registry directory (e.g. data/forge/registry)")
        if model:
            p.add_argument("--model", required=True, help="the base model directory the deltas belong to")
            p.add_argument("--params", default="params.yaml", help="knobs: its `forge` section (default: %(default)s)")

    a = fsub.add_parser("add", help="forge a jsonl file of facts into one delta; register it if it passes the gate")
    common(a, model=True)
    a.add_argument("--facts", required=True, help='jsonl: {"subject", "relation", "object"[, "templates", ...]}')
    a.add_argument("--category", default=None, help="registry category (default: the facts' category)")
    a.add_argument("--seed", type=int, default=0, help="seed of the delta's init and data order")
    a.set_defaults(func=cmd_add)
    ls = fsub.add_parser("list", help="the registered deltas")
    common(ls, model=False)
    ls.add_argument("--json", action="store_true", help="print the manifests")
    ls.set_defaults(func=cmd_list)
    r = fsub.add_parser("remove", help="remove a delta (the base's outputs return exactly)")
    common(r, model=False)
    r.add_argument("id", help="delta id (see `lmforge forge list`)")
    r.set_defaults(func=cmd_remove)
    q = fsub.add_parser("ask", help="route a prompt to the registered deltas and print the greedy continuation")
    common(q, model=True)
    q.add_argument("--prompt", required=True)
    q.add_argument("--max-new-tokens", type=int, default=8)
    q.set_defaults(func=cmd_ask)
