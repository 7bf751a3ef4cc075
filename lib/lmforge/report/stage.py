"""The `report` stage: one page of results for the whole run, `data/report/report.md` (figures in
`data/report/figures/`) and `data/report/report.html` (self-contained: renders offline).

It reads every stage's metrics.json, the training stages' curves, the forgetting heatmaps, the
governance frontier benchmark and the sources' manifest, and the audit chain. In order:

- results against baselines: pretraining vs the unigram floor, governed vs ungoverned training,
  SFT before/after, RL vs SFT (GRPO and DPO), the forgetting methods, forged deltas vs LoRA and
  full fine-tuning, the export's parity checks; every stage's headline numbers;
- the plots: loss curves by stage, governed vs ungoverned, the governance frontier, forgetting
  heatmaps, forging vs its baselines;
- lineage: the sources and their digests, then each stage's recorded inputs and outputs, taken
  from the audit record whose output digests match the outputs the report reads now;
- "This run" (last, and the only part that differs between clean runs): the audit head, wall
  time, runner and MLflow run of every stage, and the environment.

Nothing is estimated here: a number the report prints is a number a stage wrote.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ..audit import AuditLog
from ..config import StageConfig
from ..context import RunContext
from ..curves import read_table
from ..digest import sha256_path
from ..errors import InputError
from ..export.card import headline_rows, read_json
from ..tracking import flatten
from . import figures
from .document import Document
from .lineage import StageRun, audited_runs

CURVE_STAGES = ("pretrain", "govern", "sft", "rl")


class ReportConfig(StageConfig):
    title: str = "lmforge pipeline report"
    # the governance frontier benchmark (bench/govern_frontier.py), committed with its plot
    frontier_table: str | None = "bench/results/govern_frontier.json"
    frontier_plot: str | None = "bench/results/govern_frontier.png"

    def input_paths(self) -> list[str]:
        return [p for p in (self.frontier_table, self.frontier_plot) if p]


def _f(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.{digits}g}"
    return "—" if v is None else str(v)


def _pct(v: Any) -> str:
    return f"{100 * v:.1f}%" if isinstance(v, int | float) and not isinstance(v, bool) else "—"


def _signed_pct(v: Any) -> str:
    return f"{100 * v:+.2f}%" if isinstance(v, int | float) and not isinstance(v, bool) else "—"


def _short(digest: Any) -> str:
    return f"`{str(digest)[:12]}`" if digest else "—"


def _stages(inputs: Mapping[str, Path]) -> list[str]:
    """Upstream stages in the order dvc.yaml lists the report's deps (the DAG's order)."""
    out: list[str] = []
    for key in inputs:
        name = key.split("/")[0]
        if "/" in key and name != "sources" and name not in out:
            out.append(name)
    return out


def _curves(inputs: Mapping[str, Path], stage: str) -> dict[str, list[tuple[int, float]]]:
    """The stage's loss curves: every `*loss` column of its curves/ tables, labelled group/column."""
    folder = inputs.get(f"{stage}/curves")
    if folder is None:
        return {}
    out = {}
    for table in sorted(Path(folder).glob("*.csv")):
        for column, series in read_table(table).items():
            if column.endswith("loss") and series:
                out[f"{table.stem}/{column}"] = series
    return out


# --- sections --------------------------------------------------------------------------------

def _baselines(doc: Document, m: Mapping[str, Mapping[str, Any]]) -> None:
    doc.heading(2, "Results against baselines")
    doc.para("Each stage's result next to what it has to beat. Lower is better for losses and bits per byte; "
             "higher for accuracies and the forging scores.")
    rows: list[list[str]] = []
    p, g, s, r = (flatten(m.get(k, {})) for k in ("pretrain", "govern", "sft", "rl"))
    if "val_bpb" in p:
        rows.append(["pretrain", "validation bits per byte", _f(p["val_bpb"]), "unigram floor", _f(p.get("unigram_val_bpb"))])
    if "val_loss_governed" in g:
        rows.append(["govern", "validation loss", _f(g["val_loss_governed"]), "ungoverned run, same tokens",
                     _f(g.get("val_loss_ungoverned"))])
        rows.append(["govern", "parameter-gradient work skipped", _pct(g.get("skipped_fraction")), "ungoverned run",
                     "0.0%"])
    if "heldout_loss_after" in s:
        rows.append(["sft", "held-out chat loss", _f(s["heldout_loss_after"]), "before SFT", _f(s.get("heldout_loss_before"))])
        rows.append(["sft", "held-out answer accuracy", _pct(s.get("heldout_accuracy_after")), "before SFT",
                     _pct(s.get("heldout_accuracy_before"))])
    if "heldout_accuracy_rl" in r:
        gain = f" (gain {100 * r['heldout_gain']:+.1f} ± {100 * r.get('heldout_gain_se', 0):.1f} points)" \
            if "heldout_gain" in r else ""
        rows.append(["rl", "held-out accuracy, GRPO" + gain, _pct(r["heldout_accuracy_rl"]), "SFT model",
                     _pct(r.get("heldout_accuracy_sft"))])
        if "heldout_accuracy_dpo" in r:
            rows.append(["rl", "held-out accuracy, DPO", _pct(r["heldout_accuracy_dpo"]), "SFT model",
                         _pct(r.get("heldout_accuracy_sft"))])
        if "heldout_pass_at_8_rl" in r:
            rows.append(["rl", "held-out pass@8, GRPO", _pct(r["heldout_pass_at_8_rl"]), "SFT model",
                         _pct(r.get("heldout_pass_at_8_sft"))])
    gate = flatten(m.get("forgetting", {}))
    if "gate.passed" in gate:
        rows.append(["forgetting", "val bpb change of the released model vs pretrain", _signed_pct(gate.get("gate.increase")),
                     "allowed by the gate", _signed_pct(gate.get("gate.max_increase"))])
    doc.table(["stage", "measure", "result", "baseline", "baseline value"], rows)


def _forgetting(doc: Document, m: Mapping[str, Any], inputs: Mapping[str, Path]) -> None:
    methods = (m.get("benchmark") or {}).get("methods") or {}
    if not methods:
        return
    doc.heading(2, "Catastrophic forgetting")
    gate = m.get("gate") or {}
    doc.para(f"Sequential training over the domains {', '.join(f'`{d}`' for d in (m.get('benchmark') or {}).get('domains', []))}: "
             "average accuracy (ACC), backward transfer (BWT: forgetting when negative) and forward transfer (FWT), "
             f"mean ± sd over seeds. The forgetting gate {'passed' if gate.get('passed') else 'refused'} the released "
             "model.")

    def ms(v: Any) -> str:
        return f"{_f(v.get('mean'))} ± {_f(v.get('std'), 2)}" if isinstance(v, Mapping) else "—"

    doc.table(["method", "ACC", "BWT", "FWT"],
              [[f"`{name}`", ms(v.get("acc")), ms(v.get("bwt")), ms(v.get("fwt"))] for name, v in sorted(methods.items())])
    plots = inputs.get("forgetting/plots")
    for png in sorted(Path(plots).glob("*.png")) if plots else []:
        doc.figure(f"forgetting_{png.name}", png.read_bytes(), f"Forgetting: `{png.stem}`")


def _forge(doc: Document, m: Mapping[str, Any]) -> None:
    if "efficacy" not in m:
        return
    doc.heading(2, "Knowledge forging")
    base = m.get("baselines") or {}
    scores = ("efficacy", "paraphrase", "locality")
    rows = [["forged deltas (routed)", *(_f(m.get(k)) for k in scores)]]
    for name, label in (("lora", "plain LoRA"), ("full", "full fine-tune")):
        if name in base:
            rows.append([label, *(_f(base[name].get(k)) for k in scores)])
    doc.para(f"{_f(m.get('n_facts'))} facts forged into {_f(m.get('n_deltas_forged'))} deltas. Efficacy: the new "
             "facts are answered; paraphrase: also when asked differently; locality: unrelated prompts are unchanged.")
    doc.table(["method", *scores], rows)
    groups = {k: {r[0]: float(r[i + 1]) for r in rows if r[i + 1] != "—"} for i, k in enumerate(scores)}
    doc.figure("forge_vs_baselines.png", figures.bars(groups, "score", "Forged deltas vs LoRA and full fine-tuning"),
               "Forged deltas against plain LoRA and full fine-tuning")


def _govern(doc: Document, m: Mapping[str, Any], inputs: Mapping[str, Path], cfg: ReportConfig, root: Path) -> None:
    if "val_loss_governed" not in m:
        return
    doc.heading(2, "Governed training")
    doc.para(f"The governor skipped {_pct(m.get('skipped_fraction'))} of the parameter-gradient work over "
             f"{_f(m.get('steps'))} steps, at {_signed_pct(m.get('val_loss_change'))} validation loss against an "
             f"ungoverned run with the same tokens and seed ({_f(m.get('transitions'))} state changes).")
    curves = _curves(inputs, "govern")
    if curves:
        doc.figure("govern_vs_ungoverned.png", figures.loss_curves({"govern": curves}, "Governed vs ungoverned"),
                   "Governed training against the ungoverned run (same tokens and seed)")
    if cfg.frontier_table:
        rows = json.loads((root / cfg.frontier_table).read_text())
        doc.para(f"The savings-vs-loss frontier from `{cfg.frontier_table}` (bench/govern_frontier.py, committed):")
        doc.table(["setting", "seed", "skipped", "val loss change"],
                  [[str(r.get("setting")), str(r.get("seed")), _pct(r.get("skipped_fraction")),
                    _signed_pct(r.get("val_loss_change"))] for r in rows])
    if cfg.frontier_plot:
        doc.figure("govern_frontier.png", (root / cfg.frontier_plot).read_bytes(),
                   "Governance frontier: gradient work skipped against validation loss, by setting and seed")


def _export(doc: Document, m: Mapping[str, Any]) -> None:
    parity = m.get("parity") or {}
    if not parity:
        return
    doc.heading(2, "Export parity")
    doc.para("Every exported format checked against lmforge's own model on fixed prompts.")
    rows = []
    for fmt, p in sorted(parity.items()):
        diff = p.get("max_abs_logit_diff", p.get("max_abs_weight_diff"))
        kind = "logits" if "max_abs_logit_diff" in p else "weights"
        rows.append([f"`{fmt}`", f"{_f(diff, 3)} ({kind})", f"{p.get('greedy_same_prompts', 0)}/{p.get('prompts', 0)}"])
    doc.table(["runtime / file", "max abs difference", "same greedy tokens"], rows)


def _lineage(doc: Document, runs: Mapping[str, StageRun | None], manifest: Mapping[str, Any] | None) -> None:
    doc.heading(2, "Lineage")
    if manifest:
        doc.para("The sources, as `data/sources/manifest.json` records them:")
        srcs = manifest.get("sources") or {}
        doc.table(["source", "records", "licence", "sha256"],
                  [[name, _f(s.get("records")), str(s.get("licence", "")), _short(s.get("sha256"))]
                   for name, s in sorted(srcs.items()) if isinstance(s, Mapping)])
    doc.para("What each stage read and wrote, as its audit record holds them (the record whose output digests "
             "match the outputs this report read; the digests themselves are under *This run*, since two files "
             "carry per-run times: govern's metrics and the export's model card).")
    rows = []
    for stage, run in runs.items():
        if run is None:
            rows.append([stage, "—", "no audit record matches the outputs read here"])
        else:
            reads = ", ".join(f"`{p}`" for p in sorted(run.inputs)) or "(ran on a worker: see its own record)"
            rows.append([stage, reads, ", ".join(f"`{p}`" for p in sorted(run.outputs))])
    doc.table(["stage", "reads", "writes"], rows)


def _digests(doc: Document, runs: Mapping[str, StageRun | None]) -> None:
    doc.para("Every input and output of every stage with its SHA-256 digest (first 12 hex digits), from the audit "
             "records:")
    rows = []
    for stage, run in runs.items():
        if run is not None:
            rows += [[stage, "in", f"`{p}`", _short(d)] for p, d in sorted(run.inputs.items())]
            rows += [[stage, "out", f"`{p}`", _short(d)] for p, d in sorted(run.outputs.items())]
    doc.table(["stage", "", "path", "sha256"], rows)


def _this_run(doc: Document, runs: Mapping[str, StageRun | None], audit: Mapping[str, Any] | None) -> None:
    doc.run_section()
    if audit:
        doc.bullets([f"audit chain `{audit.get('chain_id')}`: {audit.get('count')} records, head "
                     f"`{audit.get('head_hash')}`, {'verified' if audit.get('verified') else 'NOT verified'} "
                     "when this report was made (`lmforge audit verify` checks it again)"])
    else:
        doc.bullets(["no audit chain was given to this run"])
    rows, env = [], None
    for stage, run in runs.items():
        if run is None:
            rows.append([stage, "—", "—", "—", "—"])
            continue
        rec = run.record
        env = rec.get("environment") or env
        wall = run.wall_s
        rows.append([stage, str(rec.get("runner", "—")), str(rec.get("started") or "—"),
                     f"{wall:.1f}" if wall is not None else "—", f"`{rec.get('mlflow_run_id') or '—'}`"])
    doc.table(["stage", "runner", "started (UTC)", "wall time (s)", "MLflow run"], rows)
    if env:
        flat = flatten(env)
        doc.table(["environment", "value"], [[k, str(v)] for k, v in sorted(flat.items())])
    _digests(doc, runs)


# --- the stage --------------------------------------------------------------------------------

def build(cfg: ReportConfig, inputs: Mapping[str, Path], root: Path, audit_log: Path | None,
          audit: Mapping[str, Any] | None) -> tuple[Document, int]:
    """The report, and how many stages it found an audit record for."""
    stages = _stages(inputs)
    metrics = {s: read_json(inputs[f"{s}/metrics.json"]) for s in stages if f"{s}/metrics.json" in inputs}
    doc = Document(cfg.title)
    doc.para("Every number below was written by a stage of this pipeline run (its `metrics.json`); the report "
             "adds none of its own.")
    _baselines(doc, metrics)
    curves = {s: _curves(inputs, s) for s in CURVE_STAGES}
    if any(curves.values()):
        doc.heading(2, "Loss curves")
        doc.figure("loss_curves.png", figures.loss_curves({s: c for s, c in curves.items() if c}),
                   "Loss by step for each training stage (from its `curves/`; `dvc plots show` draws the same data)")
    _govern(doc, metrics.get("govern", {}), inputs, cfg, root)
    _forgetting(doc, metrics.get("forgetting", {}), inputs)
    _forge(doc, metrics.get("forge", {}))
    _export(doc, metrics.get("export", {}))
    doc.heading(2, "Headline numbers by stage")
    doc.table(["stage", "metric", "value"], [list(r) for r in headline_rows(metrics)])
    read_now = {s: {str(Path("data") / k): sha256_path(p) for k, p in inputs.items()
                    if k.startswith(f"{s}/")} for s in stages}
    records = list(AuditLog(audit_log).records()) if audit_log is not None and audit_log.exists() else []
    runs = audited_runs(records, read_now)
    manifest = read_json(inputs["sources/manifest.json"]) if "sources/manifest.json" in inputs else None
    _lineage(doc, runs, manifest)
    _this_run(doc, runs, audit)
    return doc, sum(r is not None for r in runs.values())


def run(cfg: ReportConfig, inputs: Mapping[str, Path], out_dir: Path, ctx: RunContext | None = None) -> dict[str, Any]:
    ctx = ctx or RunContext()
    root = Path.cwd()
    for path in cfg.input_paths():
        if not (root / path).is_file():
            raise InputError(path, "not found", fix="run the benchmark that writes it, or set it to null in params.yaml")
    doc, audited = build(cfg, inputs, root, ctx.audit_log, ctx.audit)
    figures_dir = out_dir / "figures"
    figures_dir.mkdir(parents=True)
    for fig in doc.figures:
        (figures_dir / fig.name).write_bytes(fig.png)
    (out_dir / "report.md").write_text(doc.markdown())
    (out_dir / "report.html").write_text(doc.html())
    return {"stages": len(_stages(inputs)), "stages_audited": audited, "figures": len(doc.figures),
            "tables": doc.tables}


__all__: Sequence[str] = ("ReportConfig", "build", "run")
