"""Quality filters give the right reason; mixing hits target shares deterministically."""

from __future__ import annotations

import pytest

from lmforge.config import build
from lmforge.data import mixing
from lmforge.data.filters import FilterConfig, reason_to_drop
from lmforge.data.sources import Document
from lmforge.errors import ConfigError

PROSE = (
    "Call me Ishmael. Some years ago, never mind how long precisely, having little or no money in my "
    "purse, and nothing particular to interest me on shore, I thought I would sail about a little and "
    "see the watery part of the world. It is a way I have of driving off the spleen."
)


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("short", "too_short"),
        ("x" * 300_000, "too_long"),
        ("\n".join(["the same line again and again"] * 20) + "\n" + PROSE, "repetitive_lines"),
        ("buy now " * 200, "repetitive_ngrams"),
        ("\u2588\u2591" * 200 + PROSE, "non_text"),
        ("!?" * 200, "non_text"),
        (PROSE + "\n" + PROSE.upper(), None),
        ("def f(x):\n    return x + 1\n\n\nclass A:\n    pass\n" + PROSE, None),
    ],
)
def test_filter_reasons(text: str, reason: str | None) -> None:
    assert reason_to_drop(text, FilterConfig()) == reason


def test_filter_config_validation() -> None:
    with pytest.raises(ConfigError, match="min_chars < max_chars"):
        build(FilterConfig, {"min_chars": 10, "max_chars": 5}, "mix.filters")


def _docs(name: str, n: int, size: int) -> list[Document]:
    return [Document(f"{name}/{i}", name, "x" * size) for i in range(n)]


def test_mixing_hits_shares_and_is_deterministic() -> None:
    a, b = _docs("a", 400, 100), _docs("b", 50, 100)  # b is scarce: 5,000 units
    shares = {"a": 0.7, "b": 0.3}
    total = mixing.budget({"a": 40_000, "b": 5_000}, shares, 10_000)
    assert total == 10_000
    da = mixing.draw_source(a, [100] * 400, 7_000, 1, seed=1, source_index=0)
    db = mixing.draw_source(b, [100] * 50, 3_000, 1, seed=1, source_index=1)
    assert (da.selected, db.selected) == (7_000, 3_000)
    again = mixing.draw_source(a, [100] * 400, 7_000, 1, seed=1, source_index=0)
    assert [d.doc.id for d in again.draws] == [d.doc.id for d in da.draws]
    other = mixing.draw_source(a, [100] * 400, 7_000, 1, seed=2, source_index=0)
    assert [d.doc.id for d in other.draws] != [d.doc.id for d in da.draws]


def test_scarce_source_repeats_up_to_max_epochs_then_falls_short() -> None:
    b = _docs("b", 10, 100)  # 1,000 units available
    two = mixing.draw_source(b, [100] * 10, 1_500, 2, seed=0, source_index=0)
    assert two.selected == 1_500 and two.epochs == 2
    assert len({d.doc.id for d in two.draws if d.epoch == 0}) == 10
    one = mixing.draw_source(b, [100] * 10, 1_500, 1, seed=0, source_index=0)
    assert one.selected == 1_000 and one.epochs == 1  # the shortfall shows, it is not hidden


def test_budget_without_total_is_limited_by_scarcest_source() -> None:
    # null total means "no repetition": max_epochs only applies to an explicit total
    assert mixing.budget({"a": 9_000, "b": 1_000}, {"a": 0.5, "b": 0.5}, None) == 2_000


def test_tokens_unit_needs_a_reference_tokenizer() -> None:
    with pytest.raises(ConfigError, match="reference_tokenizer"):
        build(mixing.MixingConfig, {"unit": "tokens"}, "mix.mixing")


def test_tokens_unit_measures_with_the_reference_tokenizer(tmp_path) -> None:
    from lmforge.tokenizer import TokenizerConfig, save, train

    texts = [f"The year {1800 + i} saw {i} ships leave port." for i in range(300)]
    tok = train(texts, TokenizerConfig(vocab_size=300))
    save(tok, tmp_path / "tok")
    cfg = build(mixing.MixingConfig, {"unit": "tokens", "reference_tokenizer": str(tmp_path / "tok/tokenizer.json")},
                "mix.mixing")
    sizes = mixing.Sizer(cfg).sizes(["1234", "ships ships"])
    # digits are split one by one, so four digits are four tokens; bytes would say 4 and 11
    assert sizes[0] == 4 and sizes[1] < 11


def test_tokens_unit_with_a_bad_tokenizer_file_names_it(tmp_path) -> None:
    from lmforge.errors import InputError

    bad = tmp_path / "tokenizer.json"
    bad.write_text("{not json")
    cfg = build(mixing.MixingConfig, {"unit": "tokens", "reference_tokenizer": str(bad)}, "mix.mixing")
    with pytest.raises(InputError, match="tokenizer.json: cannot load reference tokenizer"):
        mixing.Sizer(cfg)
