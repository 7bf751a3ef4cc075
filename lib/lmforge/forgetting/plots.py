"""The benchmark's figures: a heatmap of R per method and a bar chart of ACC and BWT by method."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from ..atomic import write_bytes


def _pyplot() -> Any:
    """matplotlib.pyplot on the file-only Agg backend (no display; imported only when plotting)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any, path: Path) -> None:
    """Write `fig` as a PNG atomically (no version metadata, so the bytes repeat) and close it."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    write_bytes(path, buf.getvalue())
    _pyplot().close(fig)


def heatmap(R: np.ndarray, b: np.ndarray, domains: list[str], title: str, path: Path) -> None:
    """R (mean over seeds) with the scores at initialisation as the first row."""
    plt = _pyplot()
    grid = np.vstack([b[None, :], R])
    rows = ["init"] + [f"after {d}" for d in domains]
    fig, ax = plt.subplots(figsize=(1.4 * len(domains) + 2.5, 0.6 * len(rows) + 1.6))
    im = ax.imshow(grid, cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_yticks(range(len(rows)), rows)
    ax.set_xlabel("scored on")
    for i in range(grid.shape[0]):
        for j in range(grid.shape[1]):
            ax.text(j, i, f"{grid[i, j]:.3f}", ha="center", va="center", fontsize=8,
                    color="white" if grid[i, j] < grid.mean() else "black")
    fig.colorbar(im, ax=ax, label="next-token accuracy")
    ax.set_title(title)
    fig.tight_layout()
    _png(fig, path)


def acc_bwt_bars(summary: dict[str, dict[str, dict[str, float]]], path: Path) -> None:
    """ACC and BWT (mean ± std over seeds) by method."""
    plt = _pyplot()
    names = list(summary)
    fig, axes = plt.subplots(1, 2, figsize=(2 + 1.2 * len(names), 3.6))
    for ax, key, label in zip(axes, ("acc", "bwt"), ("ACC (higher is better)", "BWT (negative: forgetting)"),
                              strict=True):
        means = [summary[n][key]["mean"] for n in names]
        stds = [summary[n][key]["std"] for n in names]
        ax.bar(range(len(names)), means, yerr=stds, capsize=3, color="tab:blue" if key == "acc" else "tab:red")
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_title(label)
        ax.axhline(0.0, color="black", linewidth=0.6)
        if key == "acc":
            lo, hi = min(m - s for m, s in zip(means, stds, strict=True)), max(m + s for m, s in zip(means, stds, strict=True))
            pad = max(hi - lo, 1e-3) * 0.5
            ax.set_ylim(lo - pad, hi + pad)
    fig.suptitle("next-token accuracy over seeds (mean ± std)")
    fig.tight_layout()
    _png(fig, path)


def retention_bars(tab: dict[str, dict[str, Any]], path: Path) -> None:
    """Val bpb per mix source (and over all of them) for each model of the DAG, grouped by source."""
    plt = _pyplot()
    models = list(tab)
    sources = sorted(next(iter(tab.values()))["by_source"]) + ["all"]
    width = 0.8 / len(models)
    fig, ax = plt.subplots(figsize=(1.1 * len(sources) + 2.5, 3.8))
    for i, name in enumerate(models):
        values = [tab[name]["by_source"][s] for s in sources[:-1]] + [tab[name]["val_bpb"]]
        ax.bar(np.arange(len(sources)) + (i - (len(models) - 1) / 2) * width, values, width, label=name)
    ax.set_xticks(range(len(sources)), sources, rotation=30, ha="right")
    ax.set_ylabel("val bits per byte (lower is better)")
    ax.set_title("retention: each stage's model on the pretraining mix")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _png(fig, path)
