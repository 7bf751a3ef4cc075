"""One report, two renderings: Markdown (figures beside it) and self-contained HTML.

    doc = Document("lmforge pipeline report")
    doc.heading(2, "Pretraining"); doc.para("val bpb `1.78`"); doc.table(["a", "b"], [["1", "2"]])
    doc.figure("loss.png", png_bytes, "Training loss by stage")
    doc.run_section()            # what follows differs per run (times, run ids): kept last
    md, html = doc.markdown(), doc.html()

The HTML needs nothing from the network: styles are inline and figures are data: URIs, so it
renders offline and can be mailed or attached as one file. Inline `code` spans are the only
markup in text. Everything before `run_section()` depends only on the pipeline's outputs, so it
is byte-identical across clean runs; `stable_part` cuts a rendering down to that part.
"""

from __future__ import annotations

import base64
import html
import re
from collections.abc import Sequence
from dataclasses import dataclass, field

RUN_SECTION = "This run"
RUN_ID = "this-run"
_CODE = re.compile(r"`([^`]+)`")
_STYLE = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1b1f23; line-height: 1.45; }
h1 { border-bottom: 2px solid #444; padding-bottom: .2em; }
h2 { border-bottom: 1px solid #ccc; padding-bottom: .15em; margin-top: 2em; }
table { border-collapse: collapse; margin: .8em 0; font-size: 0.92em; }
th, td { border: 1px solid #c8c8c8; padding: .25em .6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { background: #f4f4f4; padding: 0 .25em; border-radius: 3px; font-size: 0.9em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9em; }
section#this-run { background: #fafafa; border-top: 3px double #999; margin-top: 2.5em; padding: 0 1em 1em; }
"""


@dataclass
class Figure:
    name: str      # file name beside report.md (figures/<name>)
    png: bytes
    caption: str


@dataclass
class Document:
    title: str
    blocks: list[tuple[str, object]] = field(default_factory=list)
    figures: list[Figure] = field(default_factory=list)
    tables: int = 0

    def heading(self, level: int, text: str) -> None:
        self.blocks.append(("heading", (level, text)))

    def para(self, text: str) -> None:
        self.blocks.append(("para", text))

    def bullets(self, items: Sequence[str]) -> None:
        self.blocks.append(("bullets", list(items)))

    def table(self, header: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        if any(len(r) != len(header) for r in rows):
            raise ValueError(f"table {list(header)}: every row needs {len(header)} cells")
        self.blocks.append(("table", (list(header), [list(r) for r in rows])))
        self.tables += 1

    def figure(self, name: str, png: bytes, caption: str) -> None:
        if any(f.name == name for f in self.figures):
            raise ValueError(f"two figures named {name!r}")
        fig = Figure(name, png, caption)
        self.figures.append(fig)
        self.blocks.append(("figure", fig))

    def run_section(self) -> None:
        self.blocks.append(("run", None))

    # --- Markdown ----------------------------------------------------------------------------
    def markdown(self, figure_dir: str = "figures") -> str:
        out = [f"# {self.title}", ""]
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value  # type: ignore[misc]
                out += [f"{'#' * level} {text}", ""]
            elif kind == "para":
                out += [str(value), ""]
            elif kind == "bullets":
                out += [*(f"- {item}" for item in value), ""]  # type: ignore[attr-defined]
            elif kind == "table":
                header, rows = value  # type: ignore[misc]
                out += [_md_row(header), "|" + "---|" * len(header), *(_md_row(r) for r in rows), ""]
            elif kind == "figure":
                fig: Figure = value  # type: ignore[assignment]
                out += [f"![{fig.caption}]({figure_dir}/{fig.name})", "", f"*{fig.caption}*", ""]
            elif kind == "run":
                out += [f"## {RUN_SECTION}", "",
                        "_Everything below differs from run to run (times, run ids, the audit head); "
                        "everything above depends only on the pipeline's outputs._", ""]
        return "\n".join(out).rstrip("\n") + "\n"

    # --- HTML --------------------------------------------------------------------------------
    def html(self) -> str:
        body: list[str] = [f"<h1>{_inline(self.title)}</h1>"]
        open_list = False
        for kind, value in self.blocks:
            if kind == "heading":
                level, text = value  # type: ignore[misc]
                body.append(f"<h{level}>{_inline(text)}</h{level}>")
            elif kind == "para":
                body.append(f"<p>{_inline(str(value))}</p>")
            elif kind == "bullets":
                body.append("<ul>" + "".join(f"<li>{_inline(i)}</li>" for i in value) + "</ul>")  # type: ignore[attr-defined]
            elif kind == "table":
                header, rows = value  # type: ignore[misc]
                head = "".join(f"<th>{_inline(h)}</th>" for h in header)
                trs = "".join("<tr>" + "".join(_td(c) for c in r) + "</tr>" for r in rows)
                body.append(f"<table><thead><tr>{head}</tr></thead><tbody>{trs}</tbody></table>")
            elif kind == "figure":
                fig: Figure = value  # type: ignore[assignment]
                data = base64.b64encode(fig.png).decode("ascii")
                body.append(f'<figure><img alt="{html.escape(fig.caption)}" data-name="{html.escape(fig.name)}" '
                            f'src="data:image/png;base64,{data}"><figcaption>{_inline(fig.caption)}</figcaption>'
                            "</figure>")
            elif kind == "run":
                open_list = True
                body.append(f'<section id="{RUN_ID}"><h2>{RUN_SECTION}</h2><p><em>Everything below differs from run '
                            "to run (times, run ids, the audit head); everything above depends only on the "
                            "pipeline's outputs.</em></p>")
        if open_list:
            body.append("</section>")
        return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
                f"<title>{html.escape(self.title)}</title>\n<style>{_STYLE}</style>\n</head>\n<body>\n"
                + "\n".join(body) + "\n</body>\n</html>\n")


def _md_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def _inline(text: str) -> str:
    return _CODE.sub(lambda m: f"<code>{m.group(1)}</code>", html.escape(text, quote=False))


_NUMBER = re.compile(r"^[-+±0-9.,%e ×]+$")


def _td(cell: str) -> str:
    cls = ' class="num"' if cell and _NUMBER.match(cell) else ""
    return f"<td{cls}>{_inline(cell)}</td>"


def stable_part(text: str) -> str:
    """A rendering without its per-run section: what two clean runs must share byte for byte."""
    for marker in (f'<section id="{RUN_ID}">', f"\n## {RUN_SECTION}\n"):
        if marker in text:
            return text.split(marker, 1)[0]
    return text
