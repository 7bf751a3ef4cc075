"""Governed training's savings-vs-loss frontier: several governor settings and seeds, each
against an ungoverned continuation with the same data order, seed and step budget.

    .venv/bin/python bench/govern_frontier.py                 # needs `make run` first (the pretrained model)
    .venv/bin/python bench/govern_frontier.py --steps 60 --seeds 1   # quicker

Reads params.yaml's `govern` section and the pipeline's data (data/pretrain/model, the
tokenizer's shards, the mix); runs in-process on the CPU. For each seed: one ungoverned run,
then one governed run per setting (SETTINGS: overrides of govern.governor). Writes
bench/results/govern_frontier.{md,json,png}: per run the share of parameter-gradient FLOPs
skipped, validation loss against the ungoverned run's, wall-clocks; the plot puts each
setting's runs on skipped-fraction vs val-loss-change axes with the goal region marked.
Results are written, not asserted. Goal: >= 25% skipped at <= 1% worse validation loss.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

import torch  # noqa: E402
import yaml  # noqa: E402

from lmforge.atomic import write_bytes, write_text  # noqa: E402
from lmforge.config import build  # noqa: E402
from lmforge.govern import GovernConfig, continue_training, prepare  # noqa: E402
from lmforge.train import dist as tdist  # noqa: E402

RESULTS = REPO / "bench" / "results"
GOAL_SKIPPED, GOAL_LOSS = 0.25, 0.01

# Governor settings (overrides of params.yaml: govern.governor).
SETTINGS: dict[str, dict[str, Any]] = {
    "params.yaml": {},
    "gradient signal only": {"cool_yield": 0.0, "converge_yield": 0.0},
    "gentle yield": {"cool_yield": 0.3, "converge_yield": 0.15},
    "eager yield": {"cool_yield": 0.7, "converge_yield": 0.4},
    "no hierarchy": {"force_at": [0.0, 0.0, 0.0]},
    "coarse-to-fine": {"force_at": [0.2, 0.4, 0.6]},
}


def inputs() -> dict[str, Path]:
    data = REPO / "data"
    paths = {"pretrain/model": data / "pretrain" / "model", "tokenizer/tokenizer": data / "tokenizer" / "tokenizer",
             "tokenizer/tokens": data / "tokenizer" / "tokens", "mix/train": data / "mix" / "train",
             "mix/val": data / "mix" / "val"}
    if missing := [str(p) for p in paths.values() if not p.exists()]:
        sys.exit(f"govern_frontier: missing {', '.join(missing)}; run `make run` first")
    return paths


def _sd(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def render(rows: list[dict[str, Any]], p: argparse.Namespace) -> str:
    lines = ["# Governed training: savings vs loss", "",
             f"{p.steps} steps per run, seeds {', '.join(map(str, p.seed_list))}, CPU ({torch.get_num_threads()} threads), "
             f"torch {torch.__version__}. Each governed run is compared with the ungoverned run of its seed "
             "(same data order, seed and steps).", "",
             "| setting | seed | skipped | val loss | ungoverned | change | governed s | ungoverned s | transitions | evals "
             "| frozen at the end (since step) |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['seed']} | {100 * r['skipped_fraction']:.1f}% | {r['val_loss']:.4f} | "
                     f"{r['val_loss_ungoverned']:.4f} | {100 * r['val_loss_change']:+.2f}% | {r['seconds']:.1f} | "
                     f"{r['seconds_ungoverned']:.1f} | {r['transitions']} | {r['evaluations']} | "
                     f"{', '.join(f'{g} ({s})' for g, s in r['converged'].items()) or '-'} |")
    lines += ["", "| setting | skipped (mean ± sd) | val loss change (mean ± sd) | wall-clock governed / ungoverned | goal |",
              "|---|---:|---:|---:|---|"]
    for name in SETTINGS:
        mine = [r for r in rows if r["setting"] == name]
        if not mine:
            continue
        sk, ch = [r["skipped_fraction"] for r in mine], [r["val_loss_change"] for r in mine]
        wall = statistics.mean(r["seconds"] / r["seconds_ungoverned"] for r in mine)
        met = all(r["skipped_fraction"] >= GOAL_SKIPPED and r["val_loss_change"] <= GOAL_LOSS for r in mine)
        lines.append(f"| {name} | {100 * statistics.mean(sk):.1f}% ± {100 * _sd(sk):.1f} | "
                     f"{100 * statistics.mean(ch):+.2f}% ± {100 * _sd(ch):.2f} | {wall:.2f}x | {'met' if met else 'not met'} |")
    lines += ["", "- skipped: share of parameter-gradient FLOPs not computed (lmforge.train.governor.grad_work) over "
              "the run; the activations' gradients still flow through frozen blocks to trainable ones below, so "
              "wall-clock savings are smaller.",
              f"- goal: >= {100 * GOAL_SKIPPED:.0f}% skipped at <= {100 * GOAL_LOSS:.0f}% worse validation loss, on "
              "every seed.",
              "- settings (overrides of params.yaml: govern.governor): "
              + "; ".join(f"{k}: {json.dumps(v) if v else 'as in params.yaml'}" for k, v in SETTINGS.items()),
              f"- Regenerate: `.venv/bin/python bench/govern_frontier.py --steps {p.steps} --seeds {p.seeds} --settings "
              + " ".join(f"'{s}'" for s in p.settings) + "`."]
    return "\n".join(lines) + "\n"


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ax.axvspan(100 * GOAL_SKIPPED, 100, ymin=0, ymax=1, color="#e8f5e9", zorder=0)
    ax.axhline(100 * GOAL_LOSS, color="#2e7d32", lw=0.8, ls="--", label="goal: <= 1% worse, >= 25% skipped")
    for name in SETTINGS:
        mine = [r for r in rows if r["setting"] == name]
        if mine:
            ax.scatter([100 * r["skipped_fraction"] for r in mine], [100 * r["val_loss_change"] for r in mine],
                       label=name, s=36, zorder=3)
    ax.set_xlabel("parameter-gradient FLOPs skipped (%)")
    ax.set_ylabel("val loss vs ungoverned (%)")
    ax.set_xlim(0, 100)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Governed training: savings vs loss")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    write_bytes(path, buf.getvalue())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--settings", nargs="*", choices=list(SETTINGS), default=list(SETTINGS))
    ap.add_argument("--out", type=Path, default=RESULTS / "govern_frontier.md")
    p = ap.parse_args()
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["govern"]
    base = build(GovernConfig, params, "params.yaml: govern")
    p.seed_list = [base.train.seed + i for i in range(p.seeds)]
    paths = inputs()
    dist = tdist.setup("cpu")
    rows: list[dict[str, Any]] = []
    for seed in p.seed_list:
        cfg = base.model_copy(update={"train": base.train.model_copy(update={"seed": seed, "steps": p.steps,
                                                                            "progress": False, "device": "cpu"})})
        mid = prepare(cfg, paths)
        _, ref, _ = continue_training(cfg, mid, paths["pretrain/model"], governed=False, dist=dist, ckpt_dir=None)
        ref_loss = ref.evals[ref.steps]["val_loss"]
        print(f"seed {seed}: ungoverned val loss {ref_loss:.4f} in {ref.seconds:.1f}s", flush=True)
        for name in p.settings:
            gcfg = base.governor.model_validate({**base.governor.model_dump(), **SETTINGS[name]})
            _, res, gov = continue_training(cfg, mid, paths["pretrain/model"], governed=True, dist=dist,
                                            ckpt_dir=None, governor=gcfg)
            assert gov is not None
            loss = res.evals[res.steps]["val_loss"]
            rows.append({"setting": name, "seed": seed, "skipped_fraction": gov.skipped_fraction, "val_loss": loss,
                         "val_loss_ungoverned": ref_loss, "val_loss_change": loss / ref_loss - 1.0,
                         "seconds": res.seconds, "seconds_ungoverned": ref.seconds, "transitions": len(gov.events),
                         "evaluations": len(gov.evals), "max_budget_sum": max(gov.budget_sums),
                         "converged": {g: st.since for g, st in gov.states.items() if st.state == "CONVERGED"}})
            print(f"  {name}: skipped {100 * gov.skipped_fraction:.1f}%, val loss {loss:.4f} "
                  f"({100 * (loss / ref_loss - 1):+.2f}%), {res.seconds:.1f}s", flush=True)
    tdist.teardown()
    text = render(rows, p)
    print(text)
    write_text(p.out, text)
    write_text(p.out.with_suffix(".json"), json.dumps(rows, indent=2) + "\n")
    plot(rows, p.out.with_suffix(".png"))


if __name__ == "__main__":
    main()
