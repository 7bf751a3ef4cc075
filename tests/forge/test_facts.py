"""Facts: made-up ones are reproducible and new, files are validated line by line, unrelated
prompts are disjoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.errors import InputError
from lmforge.forge import facts
from tests.forge.helpers import REAL


def test_invented_facts_are_reproducible_unique_and_avoid_real_subjects() -> None:
    a, b = facts.invented(100, 3), facts.invented(100, 3)
    assert a == b and len({f.subject for f in a}) == 100
    assert facts.invented(100, 4) != a
    avoid = [a[0].subject]
    assert a[0].subject not in {f.subject for f in facts.invented(100, 3, avoid=avoid)}
    for f in a:
        assert f.object in facts.OBJECTS[f.relation] and f.templates and f.paraphrases
        assert not set(f.templates) & set(f.paraphrases)  # paraphrases are held out


def test_real_facts_file_loads_countries_and_wordnet() -> None:
    assert facts.listed_sha256(REAL) is not None  # the shipped file is checked against facts.json
    real = facts.load(REAL)
    rels = {f.relation for f in real}
    assert {"capital", "region", "is_a"} <= rels
    france = [f for f in real if f.subject == "France" and f.relation == "capital"]
    assert [f.object for f in france] == ["Paris"]
    assert france[0].prompts()[0] == "The capital of France is" and france[0].target == " Paris"


def _write(tmp_path: Path, *recs: object) -> Path:
    path = tmp_path / "facts.jsonl"
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in recs))
    return path


@pytest.mark.parametrize(("rec", "message"), [
    ({"subject": "Zed", "relation": "capital", "object": ""}, "facts.jsonl:2: field 'object' is empty"),
    ({"subject": "Zed", "relation": "capital"}, "facts.jsonl:2: missing field 'object'"),
    ({"subject": "Zed", "relation": "capital", "object": 3},
     "field 'object' must be a string, got int (fix: write \"object\": \"<string>\""),
    ({"subject": "Zed", "relation": "capital", "object": " Paris"}, "leading or trailing whitespace"),
    ({"subject": "Zed", "relation": "owns", "object": "a cat"}, "relation 'owns' has no templates"),
    ({"subject": "Zed", "relation": "owns", "object": "cat", "templates": ["Zed owns a"]}, "must hold '{s}' exactly once"),
    ("{not json", "facts.jsonl:2: malformed JSON"),
])
def test_bad_fact_records_name_the_line_and_the_fix(tmp_path: Path, rec: object, message: str) -> None:
    path = _write(tmp_path, {"subject": "Yon", "relation": "capital", "object": "Ur"}, rec)
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace("{", r"\{").replace("}", r"\}")):
        facts.load(path)


def _shipped(tmp: Path) -> Path:
    """A copy of data/sources/facts.jsonl.gz with its facts.json."""
    for name in (REAL.name, facts.MANIFEST):
        (tmp / name).write_bytes((REAL.parent / name).read_bytes())
    return tmp / REAL.name


def test_a_facts_file_is_checked_against_the_facts_json_beside_it(tmp_path: Path) -> None:
    real = _shipped(tmp_path)
    assert len(facts.load(real)) == json.loads((tmp_path / facts.MANIFEST).read_text())["records"]
    mine = tmp_path / "mine.jsonl"  # a user's own file beside it: facts.json does not list it
    mine.write_text('{"subject": "Yon", "relation": "capital", "object": "Ur"}\n')
    assert [f.object for f in facts.load(mine)] == ["Ur"]
    data = real.read_bytes()
    real.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # one bit flipped
    with pytest.raises(InputError, match=rf"{real}: SHA-256 [0-9a-f]{{16}}\.\.\. does not match "
                                         rf"{tmp_path / 'facts.json'}'s [0-9a-f]{{16}}\.\.\.: .*\(fix: restore"):
        facts.load(real)


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        (lambda m: m.pop("sha256"), "key 'sha256' is missing"),
        (lambda m: m.update(sha256="ABC"), "key 'sha256' must be 64 lowercase hex digits, got 'ABC'"),
        (lambda m: m.update(file=3), "key 'file' must be a file name, got int"),
    ],
)
def test_a_damaged_facts_json_names_itself_and_the_fix(tmp_path: Path, edit, problem: str) -> None:
    real = _shipped(tmp_path)
    m = json.loads((tmp_path / facts.MANIFEST).read_text())
    edit(m)
    (tmp_path / facts.MANIFEST).write_text(json.dumps(m))
    with pytest.raises(InputError) as e:
        facts.load(real)
    assert str(e.value).startswith(f"{tmp_path / facts.MANIFEST}: {problem} (fix: rebuild the facts")


def test_custom_relation_with_templates_and_empty_file(tmp_path: Path) -> None:
    [f] = facts.load(_write(tmp_path, {"subject": "Zed", "relation": "owns", "object": "cat",
                                       "templates": ["{s} owns a"], "paraphrases": ["The pet of {s} is a"]}))
    assert f.prompts() == ["Zed owns a"] and f.paraphrase_prompts() == ["The pet of Zed is a"] and f.category == "owns"
    with pytest.raises(InputError, match="no facts in the file"):
        facts.load(_write(tmp_path))


def test_unrelated_prompts_split_into_disjoint_anchor_and_heldout_sets() -> None:
    real = facts.load(REAL)
    texts = [f"document number {i} has several words in it, enough of them" for i in range(50)]
    s = facts.unrelated(real, texts, 40, seed=1)
    assert len(s.anchor) == len(s.heldout) == 40
    assert not set(s.anchor) & set(s.heldout)
    assert s == facts.unrelated(real, texts, 40, seed=1)
    only_real = facts.unrelated(real, [], 10, seed=1)
    assert len(only_real.heldout) == 10
