"""The `forge` stage: made-up facts forged into low-rank deltas on the final model, registered,
routed, consolidated and exported as PEFT adapters, against two baselines on the same facts.

    run(cfg, {"rl/model": dir, "tokenizer/tokens": dir, "tokenizer/tokenizer": dir, "mix/val": dir,
              "sources/facts.jsonl.gz": file, "sources/facts.json": file, "forgetting/metrics.json": file},
        out_dir, ctx=ctx)

`facts.real` is read with `facts.load`, which first checks it against the sha256 in the
facts.json beside it (data/sources/facts.json, a dep of the stage in dvc.yaml).

1. `facts.invented` made-up facts (lmforge.forge.facts), in batches of `facts.per_delta`; each
   batch is forged into one delta on the frozen RL model (lmforge.forge.forging), validated
   alone through the router (efficacy, paraphrase, locality against `gate`) and, if it passes,
   added to the registry (base hash, overlap and capacity checks). Each validation and each
   refusal is a `forge.register` / `forge.refuse` audit record.
2. The registry's deltas, composed and routed per prompt: the headline efficacy, paraphrase and
   locality on every fact; the same with every delta forced on (no routing) for comparison.
3. Consolidation: the category's deltas merged by truncated SVD (lmforge.forge.consolidate); the
   merged delta replaces them only if it passes the same gate (`forge.consolidate` record).
4. Removal: on a copy of the registry, every delta removed in turn; the logits on the held-out
   prompts must equal the base's exactly (`torch.equal`), and the base's SHA-256 never changes.
5. Baselines on the same facts and budget: one plain LoRA (no KL anchors, no registry, always on)
   and a full fine-tune. Retention: val bpb per mix source for the RL model and all of these.

Outputs: `registry/` (the deltas), `adapters/<id>/` (PEFT LoRA adapters) and the metrics.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import torch
from pydantic import Field

from ..config import Config, StageConfig
from ..context import RunContext
from ..errors import ConfigError
from ..forgetting import retention
from ..forgetting.domains import source_splits
from ..inputs import read_json_object
from ..runtime import code_version, commit_time
from ..tokenizer import load_encoder
from ..tokens import read_index, split_files
from ..train import dist as tdist
from ..train.config import TrainConfig
from ..train.evaluate import token_bytes
from ..weights import load_model, tokenizer_path
from . import facts, forging
from .delta import Adapted, applied, weights_sha256
from .evaluate import encode, pad
from .lifecycle import Forger, LifecycleConfig, cached, rounded
from .peft import write_adapter
from .registry import Registry


class FactsConfig(Config):
    invented: int = Field(120, ge=1)  # made-up facts forged: the headline test
    seed: int = 7
    per_delta: int = Field(30, ge=1)  # facts per delta
    category: str = "invented"
    real: str = "data/sources/facts.jsonl.gz"  # real facts (countries, WordNet): unrelated prompts
    unrelated: int = Field(120, ge=2)  # anchor prompts, and as many held-out locality prompts


class ConsolidateConfig(Config):
    enabled: bool = True
    rank: int = Field(32, ge=1)
    repair_steps: int = Field(100, ge=0)          # after the SVD cut, train the merged delta this long on all its facts


class BaselinesConfig(Config):
    lora_rank: int | None = Field(None, ge=1)  # null: the sum of the deltas' ranks
    full_train: TrainConfig           # the full fine-tune's loop; its steps are replaced (see run)


class RetentionConfig(Config):
    seq_len: int = 256
    eval_rows: int = Field(32, ge=0)  # validation rows per mix source (0: all)
    micro_batch: int = 16


class ForgeConfig(StageConfig, LifecycleConfig):
    facts: FactsConfig = FactsConfig()
    consolidate: ConsolidateConfig = ConsolidateConfig()
    baselines: BaselinesConfig
    retention: RetentionConfig = RetentionConfig()

    def input_paths(self) -> list[str]:
        return [self.facts.real]

    def lifecycle(self) -> LifecycleConfig:
        return LifecycleConfig.model_validate({k: getattr(self, k) for k in LifecycleConfig.model_fields})


def texts(mix_dir: Path) -> list[str]:
    return [t for f in split_files(mix_dir, "val") for t in pq.read_table(f, columns=["text"]).column("text").to_pylist()]


def created(root: Path = Path(".")) -> str:
    """The commit time of the code that forged a delta: a clean re-run writes the same bytes."""
    return commit_time(root) or "unknown"


def run(cfg: ForgeConfig, inputs: Mapping[str, str | Path], out_dir: str | Path,
        ctx: RunContext | None = None) -> dict[str, Any]:
    ctx = ctx or RunContext()
    dist = tdist.setup(cfg.train.device)
    try:
        if dist.enabled:
            raise ConfigError("the forge stage runs in one process (fix: run it without torchrun)")
        return _run(cfg, inputs, Path(out_dir), ctx, dist)
    finally:
        tdist.teardown()


def _logger(ctx: RunContext, prefix: str) -> Any:
    return lambda m, s: ctx.log_metrics({f"{prefix}/{n}": v for n, v in m.items()}, s)


def _run(cfg: ForgeConfig, inputs: Mapping[str, str | Path], out: Path, ctx: RunContext,
         dist: tdist.Dist) -> dict[str, Any]:
    model_dir = Path(inputs["rl/model"])
    model, meta = load_model(model_dir, device=dist.device)
    enc = load_encoder(tokenizer_path(model_dir))
    gate_rec = read_json_object(Path(inputs["forgetting/metrics.json"]),
                                fix="re-run the forgetting stage (dvc repro forgetting)").get("gate", {})
    real = facts.load(cfg.facts.real)
    invented = facts.invented(cfg.facts.invented, cfg.facts.seed, avoid=[f.subject for f in real])
    split = facts.unrelated(real, texts(Path(inputs["mix/val"]).parent), cfg.facts.unrelated, cfg.facts.seed)
    forger = Forger(model, enc, split, cfg.lifecycle(), dist=dist)
    base_sha = forger.base_sha256
    reg = forger.registry(out / "registry")
    for d in ("registry", "adapters"):
        (out / d).mkdir(parents=True, exist_ok=True)  # declared outputs, even if every delta is refused
    # paths relative to the working directory (the repo root for a stage): the same in every clone
    provenance = {"stage": "forge", "model": Path(os.path.relpath(model_dir)).as_posix(),
                  "model_sha256": meta["files"]["model.safetensors"], "commit": code_version(Path("."))["commit"],
                  "facts": f"invented(n={cfg.facts.invented}, seed={cfg.facts.seed})",
                  "delta": cfg.delta.model_dump(mode="json")}
    when = created()

    def base_fn(x: torch.Tensor, _n: Sequence[int]) -> torch.Tensor:
        return model(x)

    # 1. forge, validate, register -------------------------------------------------------------
    batches = [invented[i:i + cfg.facts.per_delta] for i in range(0, len(invented), cfg.facts.per_delta)]
    per_delta = []
    for k, batch in enumerate(batches):
        row = {"batch": k} | forger.add(reg, batch, category=cfg.facts.category, seed=cfg.train.seed + k, created=when,
                                        provenance=provenance | {"batch": k}, cache=ctx.scratch / f"delta-{k}.safetensors",
                                        ckpt_dir=ctx.scratch / f"ckpt-delta-{k}", log=_logger(ctx, f"delta{k}"))
        ctx.decisions.append({"kind": "forge.register" if row["accepted"] else "forge.refuse", **row})
        per_delta.append(row)
    owner = {f.subject: row["id"] for b, row in zip(batches, per_delta, strict=True) if row["accepted"] for f in b}
    accepted = [f for f in invented if f.subject in owner]

    # 2. composed and routed -----------------------------------------------------------------------
    entries = reg.entries()
    forged = forger.evaluate(forger.routed(entries), invented)
    with applied(model, [e.delta for e in entries]):
        forced = forger.evaluate(base_fn, invented)
    rt = forger.router({e.id: e.key for e in entries})
    to_owner = [rt.route(encode(enc, p)[0]) == [owner[f.subject]]
                for f in accepted for p in f.prompts() + f.paraphrase_prompts()]
    false_hits = [bool(rt.route(encode(enc, p)[0])) for p in split.heldout]

    # 3. consolidation --------------------------------------------------------------------------------
    consolidation: dict[str, Any] = {"enabled": cfg.consolidate.enabled}
    if cfg.consolidate.enabled and len(entries) > 1:
        consolidation |= forger.consolidate(
            reg, entries, accepted, rank=cfg.consolidate.rank, repair_steps=cfg.consolidate.repair_steps,
            seed=cfg.train.seed, created=when, provenance=provenance, cache=ctx.scratch / "merged.safetensors",
            ckpt_dir=ctx.scratch / "ckpt-merged", log=_logger(ctx, "merged"))
        ctx.decisions.append({"kind": "forge.consolidate", **consolidation})

    # 4. removal is exact ---------------------------------------------------------------------------
    removal = _removal(reg, forger, split.heldout, ctx.scratch / "removal")

    # 5. baselines and retention ---------------------------------------------------------------------
    steps = cfg.train.total_steps(0) * len(batches)
    lora_cfg = cfg.delta.model_copy(update={"kl_weight": 0.0,
                                            "rank": cfg.baselines.lora_rank or cfg.delta.rank * len(batches)})
    lora = cached(ctx.scratch / "lora.safetensors", lambda: forging.forge(
        model, enc, invented, [], lora_cfg, cfg.train.model_copy(update={"steps": steps}), dist=dist,
        seed=cfg.train.seed, ckpt_dir=ctx.scratch / "ckpt-lora", log=_logger(ctx, "lora"))[0])
    with applied(model, [lora]):
        lora_m = forger.evaluate(base_fn, invented)
    tuned, _ = forging.finetune(model, enc, invented, cfg.baselines.full_train.model_copy(update={"steps": steps}),
                                dist=dist, seed=cfg.train.seed, ckpt_dir=ctx.scratch / "ckpt-full",
                                log=_logger(ctx, "full"))
    full_m = forger.evaluate(lambda x, _n: tuned(x), invented)

    vocab = int(read_index(Path(inputs["tokenizer/tokens"]))["vocab_size"])
    tbytes = token_bytes(Path(inputs["tokenizer/tokenizer"]), vocab)
    rows = retention.source_rows(source_splits(inputs["tokenizer/tokens"], Path(inputs["mix/val"]).parent, "val"),
                                 cfg.retention.seq_len, cfg.retention.eval_rows)
    final = reg.entries()
    nets = {"rl": model, "forge": forger.routed(final), "forge_unrouted": Adapted(model, *[e.delta for e in final]),
            "lora": Adapted(model, lora), "full": tuned}
    ret = {}
    for name, net in nets.items():
        t = retention.score(net, rows, tbytes, dist, micro_batch=cfg.retention.micro_batch)
        ret[name] = {"val_bpb": rounded(t["val_bpb"]), "by_source": {s: rounded(v) for s, v in sorted(t["by_source"].items())}}
    removal["base_sha256_unchanged"] = weights_sha256(model) == base_sha
    if not removal["base_sha256_unchanged"]:
        raise AssertionError("the base model's weights changed during the forge stage")  # a bug, never expected

    # 6. PEFT adapters ----------------------------------------------------------------------------------
    for e in final:
        write_adapter(e.delta, out / "adapters" / e.id, base_model="data/export/hf")

    return {
        "n_facts": len(invented), "n_deltas_forged": len(batches), "base_sha256": base_sha,
        "released_by_forgetting_gate": gate_rec.get("passed"),
        **forged,
        "unrouted": forced,
        "routing": {"fact_prompts_to_their_delta": rounded(sum(to_owner) / max(len(to_owner), 1)),
                    "unrelated_prompts_activating": rounded(sum(false_hits) / max(len(false_hits), 1))},
        "deltas": per_delta,
        "consolidation": consolidation,
        "removal": removal,
        "baselines": {"lora": lora_m | {"rank": lora.rank}, "full": full_m},
        "retention": ret,
        "registry": {"ids": reg.ids(), "usage": reg.usage(final)},
        "gate": cfg.gate.model_dump(),
    }


def _removal(reg: Registry, forger: Forger, prompts: Sequence[str], work: Path) -> dict[str, Any]:
    """Remove every delta from a copy of the registry, one at a time; afterwards the routed model's
    logits on `prompts` and on the deltas' own fact prompts must equal the base's exactly."""
    if work.exists():
        shutil.rmtree(work)
    shutil.copytree(reg.root, work)
    copy = Registry(work, base_sha256=reg.base_sha256, policy=reg.policy, shapes=reg.shapes)
    entries = copy.entries()
    own = [t.format(s=f["subject"]) for e in entries for f in e.manifest["facts"][:5] for t in f["templates"][:1]]
    x = torch.from_numpy(pad([encode(forger.enc, p)[0] for p in list(prompts) + own])).to(forger.dist.device)
    with torch.no_grad():
        base = forger.model(x)
        changed = bool(entries) and not torch.equal(forger.routed(entries)(x), base)
        for e in entries:
            copy.remove(e.id)
        after = forger.routed(copy.entries())(x)
    shutil.rmtree(work)
    return {"deltas_removed": len(entries), "logits_changed_while_registered": changed,
            "logits_equal_after_removal": bool(torch.equal(after, base)), "prompts": int(x.shape[0])}
