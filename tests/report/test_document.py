"""lmforge.report: the two renderings, their stable part, the figures, and the lineage match."""

from __future__ import annotations

import base64
import re

import pytest

from lmforge.report import figures
from lmforge.report.document import Document, stable_part
from lmforge.report.lineage import audited_runs


def _doc(run_value: str) -> Document:
    doc = Document("A <report>")
    doc.heading(2, "Results")
    doc.para("val bpb `1.78` < 3.3 & falling")
    doc.table(["stage", "value"], [["pretrain", "1.78"], ["a|b", "`x`"]])
    doc.figure("loss.png", figures.loss_curves({"pretrain": {"train/loss": [(1, 3.0), (2, 2.5)]}}), "Loss")
    doc.run_section()
    doc.bullets([f"audit head `{run_value}`"])
    return doc


def test_markdown_has_tables_figure_links_and_the_run_section_last() -> None:
    md = _doc("abc").markdown()
    assert md.startswith("# A <report>\n")
    assert "| stage | value |\n|---|---|\n| pretrain | 1.78 |\n| a\\|b | `x` |" in md
    assert "![Loss](figures/loss.png)" in md
    assert md.index("## This run") > md.index("![Loss]")


def test_html_is_self_contained_escaped_and_embeds_the_figure() -> None:
    doc = _doc("abc")
    page = doc.html()
    assert "<title>A &lt;report&gt;</title>" in page
    assert "<p>val bpb <code>1.78</code> &lt; 3.3 &amp; falling</p>" in page
    assert page.count("<table>") == doc.tables == 1
    # nothing is fetched: no http(s) URL, no external stylesheet or script
    assert not re.search(r"(src|href)=\"(?!data:)", page)
    assert "<script" not in page and "<link" not in page
    data = re.search(r'src="data:image/png;base64,([^"]+)"', page).group(1)  # type: ignore[union-attr]
    assert base64.b64decode(data) == doc.figures[0].png
    assert page.index('<section id="this-run">') > page.index("<figure>")


def test_stable_part_ignores_what_differs_per_run() -> None:
    a, b = _doc("run-1"), _doc("run-2")
    assert a.markdown() != b.markdown() and a.html() != b.html()
    assert stable_part(a.markdown()) == stable_part(b.markdown())
    assert stable_part(a.html()) == stable_part(b.html())
    assert "This run" not in stable_part(a.html())


def test_figures_are_the_same_bytes_every_time() -> None:
    curves = {"sft": {"train/loss": [(i, 1.0 / (i + 1)) for i in range(30)]}}
    assert figures.loss_curves(curves) == figures.loss_curves(curves)
    png = figures.bars({"efficacy": {"forged": 1.0, "lora": 0.5}}, "score", "t")
    assert png.startswith(b"\x89PNG") and png == figures.bars({"efficacy": {"forged": 1.0, "lora": 0.5}}, "score", "t")


def test_a_ragged_table_or_a_duplicate_figure_is_refused() -> None:
    doc = Document("t")
    with pytest.raises(ValueError, match="every row needs 2 cells"):
        doc.table(["a", "b"], [["1"]])
    doc.figure("x.png", b"", "x")
    with pytest.raises(ValueError, match="two figures named"):
        doc.figure("x.png", b"", "y")


def test_lineage_takes_the_last_record_whose_outputs_match() -> None:
    records = [
        {"kind": "genesis"},
        {"kind": "stage", "stage": "mix", "outputs": {"data/mix/metrics.json": "old"}, "seq": 1},
        {"kind": "stage", "stage": "mix", "outputs": {"data/mix/metrics.json": "new", "data/mix/train": "t"}, "seq": 2},
        {"kind": "stage", "stage": "mix", "outputs": {"data/mix/metrics.json": "old"}, "seq": 3},
        {"kind": "stage.remote", "stage": "pretrain", "outputs": {"data/pretrain/metrics.json": "p"}, "seq": 4,
         "worker_record": {"started": "2026-01-01T00:00:00+00:00", "finished": "2026-01-01T00:01:30+00:00"}},
        {"kind": "decision", "stage": "sft", "outputs": {"data/sft/metrics.json": "s"}},
    ]
    runs = audited_runs(records, {"mix": {"data/mix/metrics.json": "new"}, "pretrain": {"data/pretrain/metrics.json": "p"},
                                  "sft": {"data/sft/metrics.json": "s"}})
    assert runs["mix"] is not None and runs["mix"].record["seq"] == 2
    assert runs["pretrain"] is not None and runs["pretrain"].remote and runs["pretrain"].wall_s == 90.0
    assert runs["sft"] is None  # only stage records count, not a decision that names outputs
