"""The report's own plots, as PNG bytes that are identical across runs (Agg, fixed size and dpi,
no timestamp or software tag in the file).

    png = loss_curves({"pretrain": {"train/loss": [(0, 7.1), ...]}, ...})
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

Series = Sequence[tuple[int, float]]


def _png(fig) -> bytes:  # type: ignore[no-untyped-def]
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, metadata={"Software": None})
    plt.close(fig)
    return buf.getvalue()


def loss_curves(stages: Mapping[str, Mapping[str, Series]], title: str = "Loss by step") -> bytes:
    """One panel per stage; each curve a (step, value) series labelled by its metric name."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [s for s, curves in stages.items() if curves]
    if not names:
        raise ValueError("no curves to plot")
    cols = min(len(names), 2)
    rows = (len(names) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 3.6 * rows), squeeze=False)
    for ax, stage in zip(axes.flat, names, strict=False):
        for label, series in sorted(stages[stage].items()):
            steps, values = zip(*series, strict=True)
            ax.plot(steps, values, label=label, marker="o" if len(series) < 12 else None, markersize=3, linewidth=1.2)
        ax.set_title(stage)
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return _png(fig)


def bars(groups: Mapping[str, Mapping[str, float]], ylabel: str, title: str) -> bytes:
    """Grouped bars: {group: {series: value}} (e.g. {efficacy: {forged: 1.0, lora: 0.9}})."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = sorted({s for values in groups.values() for s in values})
    if not groups or not series:
        raise ValueError("no values to plot")
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(7, 3.6))
    for i, name in enumerate(series):
        xs = [g + i * width for g in range(len(groups))]
        ax.bar(xs, [values.get(name, 0.0) for values in groups.values()], width, label=name)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], list(groups))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return _png(fig)
