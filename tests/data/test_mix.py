"""mix.run end to end on the fixture slice plus planted duplicates: accounting, lineage, determinism."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from lmforge.config import build
from lmforge.data.mix import MixConfig, run
from lmforge.digest import sha256_path

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = ROOT / "tests" / "fixtures" / "sources"
BASE = ("It was a bright cold day in April and the clocks were striking thirteen while Winston Smith "
        "slipped quickly through the glass doors of Victory Mansions though not quickly enough to "
        "prevent a swirl of gritty dust from entering along with him. ") * 2


def _planted(path: Path) -> None:
    near = BASE.replace("bright cold", "bright chilly")  # one word of ~90 changed
    rows = [{"id": "a", "text": BASE}, {"id": "b", "text": near}, {"id": "c", "text": near},
            {"id": "d", "text": "An unrelated note on tides: the moon pulls the sea toward it, the earth "
                                "turns beneath that bulge, and most harbours see two high waters a day."},
            {"id": "e", "text": "A third text, about bread: flour, water, salt and yeast, kneaded until "
                                "smooth, proved twice and baked hot until the crust sings when tapped."}]
    path.write_bytes(gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode(), mtime=0))


def _cfg(tmp: Path, **over: object) -> MixConfig:
    _planted(tmp / "planted.jsonl.gz")
    sources = [{"name": n, "path": str(FIXTURES / f"{n}.jsonl.gz"), "share": s, "licence": "test"}
               for n, s in (("shakespeare", 0.3), ("python_stdlib", 0.3), ("math", 0.3))]
    sources.append({"name": "planted", "path": str(tmp / "planted.jsonl.gz"), "share": 0.1, "licence": "test"})
    params = {"sources": sources, "mixing": {"total": 60_000}, "val_fraction": 0.1,
              "filters": {"min_chars": 50}, **over}
    return build(MixConfig, params, "mix")


def _table(path: Path) -> list[dict]:
    files = sorted(path.glob("*.parquet")) if path.is_dir() else [path]
    return [r for f in files for r in pq.read_table(f).to_pylist()]


@pytest.fixture(scope="module")
def mixed(tmp_path_factory: pytest.TempPathFactory) -> tuple[MixConfig, Path, dict]:
    tmp = tmp_path_factory.mktemp("mix")
    cfg = _cfg(tmp, val_max_docs_per_source=3)
    out = tmp / "out"
    return cfg, out, run(cfg, {}, out)


def test_every_document_is_accounted_for(mixed: tuple[MixConfig, Path, dict]) -> None:
    cfg, out, m = mixed
    train, val, dropped = _table(out / "train"), _table(out / "val"), _table(out / "dropped.parquet")
    for name, st in m["sources"].items():
        assert st["docs_in"] == st["docs_kept"] + st["docs_dropped"], name
        assert st["docs_kept"] == st["train_pool_docs"] + st["val_docs"], name  # the val cap loses nothing
        assert 1 <= st["val_docs"] <= 3, name  # every source has a val score, capped
        assert st["docs_dropped"] == sum(1 for d in dropped if d["source"] == name), name
    assert len(val) == sum(st["val_docs"] for st in m["sources"].values())
    assert not {r["id"] for r in train} & {r["id"] for r in val}


def test_duplicates_point_at_kept_documents(mixed: tuple[MixConfig, Path, dict]) -> None:
    _, out, m = mixed
    dropped = {d["id"]: d for d in _table(out / "dropped.parquet")}
    assert dropped["planted/b"]["reason"] == "near_duplicate"
    assert dropped["planted/c"]["reason"] == "exact_duplicate"
    # c is an exact copy of b, which itself went as a near copy of a: c points at a, the keeper
    assert dropped["planted/b"]["duplicate_of"] == dropped["planted/c"]["duplicate_of"] == "planted/a"
    assert not {"planted/a", "planted/d", "planted/e"} & set(dropped)
    assert m["sources"]["planted"]["duplicate_clusters"] == 1
    assert m["sources"]["planted"]["dropped"]["near_duplicate"] == 1


def test_shares_are_met(mixed: tuple[MixConfig, Path, dict]) -> None:
    cfg, _, m = mixed
    for src in cfg.sources:
        st = m["sources"][src.name]
        if src.name != "planted":  # each lands within half a document of share x total
            assert abs(st["units_train"] - src.share * 60_000) < 2_500, src.name
    # three short documents cannot make 10% of 60 kB even repeated: the shortfall shows, not hidden
    assert m["sources"]["planted"]["achieved_share"] < 0.05


def test_same_inputs_give_the_same_bytes(mixed: tuple[MixConfig, Path, dict], tmp_path: Path) -> None:
    cfg, out, _ = mixed
    again = tmp_path / "again"
    run(cfg, {}, again)
    for part in ("train", "val", "dropped.parquet"):
        assert sha256_path(again / part) == sha256_path(out / part), part
    other = run(cfg.model_copy(update={"seed": cfg.seed + 1}), {}, tmp_path / "other")
    assert sha256_path(tmp_path / "other" / "train") != sha256_path(out / "train")
    assert other["sources"]["shakespeare"]["docs_in"] > 0


def test_config_bounds(tmp_path: Path) -> None:
    from lmforge.errors import ConfigError

    for bad in ({"rows_per_shard": 0}, {"val_max_docs_per_source": 0}, {"filters": {"min_chars": 0}}):
        with pytest.raises(ConfigError, match="at least 1|1 <= min_chars"):
            _cfg(tmp_path, **bad)
