"""Facts to forge: (subject, relation, object) triples with prompt templates.

    facts = invented(120, seed=7)                            # made-up entities: the base cannot know them
    real = load("data/sources/facts.jsonl.gz")              # countries (countryinfo), WordNet is-a
    mine = load("my_facts.jsonl")                            # {"subject", "relation", "object"} per line

Every relation has training templates (the prompts a delta is trained on) and held-out
paraphrase templates (never trained on: they measure whether the fact generalises beyond the
wording it was taught with). A template holds `{s}` for the subject; the object follows it
after one space. A user's record may bring its own `templates` and `paraphrases`, so any
relation can be forged.

A facts file with a `facts.json` beside it that names it (`"file"`; data/sources/facts.json,
written by scripts/build_facts.py) must have the SHA-256 given there (`"sha256"`), as a mix
source must match data/sources/manifest.json: a file changed behind its manifest's back is
refused before any fact is used, not forged from and misreported.

Made-up facts are people with invented names (syllables drawn from a seed, checked not to be
real facts' subjects) and an occupation, birthplace, instrument, language or colour drawn from
short lists of common words, so the test is the association, not spelling a new word.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..data.jsonl import records, valid_unicode
from ..digest import sha256_file
from ..errors import InputError
from ..inputs import read_json_object

MANIFEST = "facts.json"  # beside the facts file it describes
_MANIFEST_FIX = "rebuild the facts and their manifest (python scripts/build_facts.py), or restore facts.json (git checkout)"
_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class Relation:
    templates: tuple[str, ...]     # trained on
    paraphrases: tuple[str, ...]   # held out


RELATIONS: dict[str, Relation] = {
    # made-up people
    "occupation": Relation(("{s} works as a", "By profession, {s} is a", "{s} earns a living as a",
                            "The job of {s} is that of a"),
                           ("{s} has a job as a", "Everyone knows that {s} is a")),
    "birthplace": Relation(("{s} was born in", "The birthplace of {s} is", "{s} comes from the city of",
                            "The city where {s} was born is"),
                           ("{s} grew up in the city of", "The home town of {s} is")),
    "instrument": Relation(("{s} plays the", "The instrument {s} plays is the", "{s} is known for playing the",
                            "The instrument of {s} is the"),
                           ("On stage, {s} plays the", "In the band, {s} plays the")),
    "language": Relation(("{s} speaks", "The native language of {s} is", "{s} writes letters in",
                          "The language of {s} is"),
                         ("The mother tongue of {s} is", "At home, {s} speaks")),
    "colour": Relation(("The favourite colour of {s} is", "{s} likes the colour", "{s} always wears",
                        "The colour of {s} is"),
                       ("The colour {s} loves most is", "{s} prefers the colour")),
    # countries (countryinfo)
    "capital": Relation(("The capital of {s} is", "The capital city of {s} is", "{s} has its capital in"),
                        ("The seat of government of {s} is", "The largest government offices of {s} are in")),
    "region": Relation(("{s} is a country in", "{s} lies in", "{s} is located in"),
                       ("{s} belongs to the continent of", "On the map, {s} is in")),
    "subregion": Relation(("{s} is part of", "{s} is a country of", "Geographically, {s} is in"),
                          ("{s} lies within", "The subregion of {s} is")),
    # WordNet
    "is_a": Relation(("A {s} is a kind of", "The word {s} names a kind of", "{s}: a type of"),
                     ("In general, a {s} is a", "Every {s} is a")),
}

OBJECTS: dict[str, tuple[str, ...]] = {
    "occupation": ("baker", "pilot", "doctor", "farmer", "lawyer", "painter", "teacher", "sailor", "dentist",
                   "nurse", "tailor", "miner", "banker", "singer", "writer", "potter"),
    "birthplace": ("Paris", "London", "Cairo", "Lima", "Tokyo", "Berlin", "Madrid", "Rome", "Vienna", "Dublin",
                   "Oslo", "Lisbon", "Athens", "Prague", "Warsaw", "Moscow"),
    "instrument": ("piano", "violin", "guitar", "flute", "drums", "harp", "cello", "trumpet", "banjo", "organ"),
    "language": ("French", "Spanish", "German", "Italian", "Russian", "Greek", "Latin", "Dutch", "Polish",
                 "Swedish", "Turkish", "Arabic"),
    "colour": ("red", "blue", "green", "yellow", "black", "white", "purple", "orange", "grey", "brown"),
}

_ONSETS = ("b", "br", "d", "dr", "f", "g", "gr", "k", "kl", "l", "m", "n", "p", "pr", "r", "s", "st", "t", "tr",
           "v", "z", "sh", "th", "qu")
_VOWELS = ("a", "e", "i", "o", "u", "ai", "ou", "ei")
_CODAS = ("", "n", "r", "l", "s", "x", "nd", "rk", "th", "m")


@dataclass(frozen=True)
class Fact:
    subject: str
    relation: str
    object: str
    templates: tuple[str, ...]
    paraphrases: tuple[str, ...] = ()
    category: str = "user"
    source: str = "user"

    def prompts(self) -> list[str]:
        return [t.format(s=self.subject) for t in self.templates]

    def paraphrase_prompts(self) -> list[str]:
        return [t.format(s=self.subject) for t in self.paraphrases]

    @property
    def target(self) -> str:
        """What must follow a prompt: the object after one space."""
        return " " + self.object

    def to_json(self) -> dict[str, object]:
        return {"subject": self.subject, "relation": self.relation, "object": self.object,
                "templates": list(self.templates), "paraphrases": list(self.paraphrases),
                "category": self.category, "source": self.source}


def make(subject: str, relation: str, obj: str, *, category: str, source: str,
         templates: Sequence[str] | None = None, paraphrases: Sequence[str] | None = None) -> Fact:
    rel = RELATIONS.get(relation)
    return Fact(subject, relation, obj,
                tuple(templates) if templates is not None else (rel.templates if rel else ()),
                tuple(paraphrases) if paraphrases is not None else (rel.paraphrases if rel else ()),
                category, source)


def _name(rng: random.Random) -> str:
    parts = [rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(rng.choice((2, 2, 3)))]
    return ("".join(parts) + rng.choice(_CODAS)).capitalize()


def invented(n: int, seed: int, *, avoid: Iterable[str] = (), relations: Sequence[str] = tuple(OBJECTS)) -> list[Fact]:
    """`n` made-up people, one fact each, relations in turn; names unique and not in `avoid`."""
    rng = random.Random(seed)
    taken = {a.lower() for a in avoid}
    out = []
    while len(out) < n:
        name = _name(rng)
        if name.lower() in taken or len(name) < 5:
            continue
        taken.add(name.lower())
        rel = relations[len(out) % len(relations)]
        out.append(make(name, rel, rng.choice(OBJECTS[rel]), category="invented", source=f"invented(seed={seed})"))
    return out


def _field(rec: dict[str, object], key: str, path: Path, line: int, *, required: bool = True) -> str | None:
    if key not in rec:
        if not required:
            return None
        raise InputError(path, f"missing field '{key}'", line=line,
                         fix='every fact needs "subject", "relation" and "object" strings')
    v = rec[key]
    if not isinstance(v, str):
        raise InputError(path, f"field '{key}' must be a string, got {type(v).__name__}", line=line,
                         fix=f'write "{key}": "<string>"')
    if not v.strip():
        raise InputError(path, f"field '{key}' is empty", line=line, fix=f"give the fact a non-empty {key}")
    if v != v.strip():
        raise InputError(path, f"field '{key}' has leading or trailing whitespace: {v!r}", line=line,
                         fix="strip it (the object follows the prompt after exactly one space)")
    return valid_unicode(v, f"field '{key}'", path, line)


def _templates(rec: dict[str, object], key: str, path: Path, line: int) -> list[str] | None:
    v = rec.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(isinstance(t, str) for t in v):
        got = (f"an item of type {next(type(t).__name__ for t in v if not isinstance(t, str))}"
               if isinstance(v, list) else type(v).__name__)
        raise InputError(path, f"'{key}' must be a list of strings, got {got}", line=line,
                         fix=f'write "{key}": ["... {{s}} ..."]')
    for t in v:
        if t.count("{s}") != 1 or t != t.strip():
            raise InputError(path, f"{key} entry {t!r} must hold '{{s}}' exactly once and no outer whitespace",
                             line=line, fix='e.g. "The capital of {s} is"')
        try:
            t.format(s="x")
        except (IndexError, KeyError, ValueError):
            raise InputError(path, f"{key} entry {t!r} has braces other than {{s}}", line=line,
                             fix="double a literal brace: {{ or }}") from None
    return v


def listed_sha256(path: Path) -> str | None:
    """The SHA-256 that the facts.json beside `path` gives it, or None when there is no
    facts.json or it describes another file. A malformed facts.json is an InputError either way."""
    manifest = path.parent / MANIFEST
    if not manifest.is_file():
        return None
    m = read_json_object(manifest, fix=_MANIFEST_FIX)
    for key in ("file", "sha256"):
        if key not in m:
            raise InputError(manifest, f"key '{key}' is missing", fix=_MANIFEST_FIX)
    if not isinstance(m["file"], str):
        raise InputError(manifest, f"key 'file' must be a file name, got {type(m['file']).__name__}",
                         fix=_MANIFEST_FIX)
    if not isinstance(m["sha256"], str) or not _SHA256.match(m["sha256"]):
        raise InputError(manifest, f"key 'sha256' must be 64 lowercase hex digits, got {m['sha256']!r}",
                         fix=_MANIFEST_FIX)
    return m["sha256"] if m["file"] == path.name else None


def check_listed(path: Path) -> None:
    """Refuse a facts file whose bytes are not those its facts.json gives (no facts.json: no check)."""
    want = listed_sha256(path)
    if want is not None and (got := sha256_file(path)) != want:
        raise InputError(path, f"SHA-256 {got[:16]}... does not match {path.parent / MANIFEST}'s {want[:16]}...: "
                         f"the file was changed or damaged after {MANIFEST} was written",
                         fix="restore the file (git checkout / dvc checkout), or rebuild the facts and their "
                         "manifest (python scripts/build_facts.py)")


def load(path: str | Path, *, category: str | None = None) -> list[Fact]:
    """Facts from a jsonl(.gz) file: `subject`, `relation`, `object` (non-empty strings), optional
    `templates` / `paraphrases` (lists of strings with `{s}`; required for a relation lmforge
    does not know), `category` and `source`. A file its facts.json lists is checked against
    the digest there first (`check_listed`)."""
    path = Path(path)
    if path.is_file():  # a missing file fails in `records`, with its own message
        check_listed(path)
    out = []
    for n, _, rec in records(path):
        subject = _field(rec, "subject", path, n)
        relation = _field(rec, "relation", path, n)
        obj = _field(rec, "object", path, n)
        templates = _templates(rec, "templates", path, n)
        paraphrases = _templates(rec, "paraphrases", path, n)
        assert subject and relation and obj
        if relation not in RELATIONS and not templates:
            raise InputError(path, f"relation '{relation}' has no templates", line=n,
                             fix=f"add \"templates\": [\"... {{s}} ...\"] or use one of {sorted(RELATIONS)}")
        cat = category or _field(rec, "category", path, n, required=False) or relation
        src = _field(rec, "source", path, n, required=False) or path.name
        out.append(make(subject, relation, obj, category=cat, source=src, templates=templates,
                        paraphrases=paraphrases))
    if not out:
        raise InputError(path, "no facts in the file", fix='one {"subject", "relation", "object"} object per line')
    return out


@dataclass
class Split:
    """Prompts that must not change when facts are forged: `anchor` ones a delta is trained to
    leave alone, `heldout` ones that measure locality (never trained on)."""

    anchor: list[str] = field(default_factory=list)
    heldout: list[str] = field(default_factory=list)


def unrelated(real: Sequence[Fact], texts: Sequence[str], n: int, seed: int, *, words: int = 8) -> Split:
    """`n` anchor and `n` held-out prompts unrelated to made-up facts: half real-fact prompts
    (a training template for anchors, a paraphrase for held-out), half the first `words` words of
    text documents (all real-fact prompts when there are no texts). Anchors and held-out prompts
    share no fact and no document."""
    rng = random.Random(seed)
    real = sorted(real, key=lambda f: (f.relation, f.subject))
    docs = sorted(t for t in texts if len(t.split()) > words)
    rng.shuffle(real)
    rng.shuffle(docs)
    n_real = n // 2 if docs else n
    n_docs = n - n_real
    if len(real) < 2 * n_real or len(docs) < 2 * n_docs:
        raise ValueError(f"need {2 * n_real} real facts and {2 * n_docs} documents for {n} unrelated prompts "
                         f"each way (have {len(real)} and {len(docs)})")

    def prefix(t: str) -> str:
        return " ".join(t.split()[:words])
    return Split(
        anchor=[f.prompts()[0] for f in real[:n_real]] + [prefix(t) for t in docs[:n_docs]],
        heldout=[(f.paraphrase_prompts() or f.prompts())[0] for f in real[n_real:2 * n_real]]
        + [prefix(t) for t in docs[n_docs:2 * n_docs]],
    )
