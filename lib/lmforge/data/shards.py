"""Deterministic parquet shards: same rows in, same bytes out."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pandera.pandas as pa
import pyarrow as pa_arrow
import pyarrow.parquet as pq

from ..errors import LmforgeError


def validate(df: pd.DataFrame, schema: pa.DataFrameSchema, what: str) -> None:
    try:
        schema.validate(df, lazy=True)
    except pa.errors.SchemaErrors as e:
        cases = [f"column {r['column']!r}: {r['check']} failed on {str(r['failure_case'])[:80]!r}"
                 for r in e.failure_cases.head(5).to_dict("records")]
        raise LmforgeError(f"{what}: {len(e.failure_cases)} schema violation(s): " + "; ".join(cases)) from None


def _frame(columns: dict[str, list]) -> pd.DataFrame:
    # dtype given explicitly: an empty column would otherwise be inferred as float64
    return pd.DataFrame({k: pd.Series(v, dtype="str") for k, v in columns.items()})


def write_table(
    columns: dict[str, list], path: Path, schema: pa.DataFrameSchema | None, what: str
) -> None:
    """Validate `columns` against `schema` (None: already validated by the caller), then write."""
    if schema is not None:
        validate(_frame(columns), schema, what)
    # Built from python lists (not pandas) so no pandas index metadata varies between runs.
    table = pa_arrow.table({k: pa_arrow.array(v, type=pa_arrow.string()) for k, v in columns.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, path, compression="zstd", use_dictionary=["source", "reason"], write_statistics=False)


def write_shards(
    columns: dict[str, list], out_dir: Path, schema: pa.DataFrameSchema, rows_per_shard: int, what: str
) -> int:
    """Write `columns` as out_dir/part-00000.parquet, ...; returns the number of shards.

    The whole split is validated once, so uniqueness holds across shards, not just within one.
    """
    validate(_frame(columns), schema, what)
    n = len(next(iter(columns.values())))
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = max(1, -(-n // rows_per_shard))
    for s in range(shards):
        part = {k: v[s * rows_per_shard : (s + 1) * rows_per_shard] for k, v in columns.items()}
        write_table(part, out_dir / f"part-{s:05d}.parquet", None, f"{what} shard {s}")
    return shards


def read_shards(directory: Path, columns: list[str] | None = None) -> pa_arrow.Table:
    files = sorted(directory.glob("part-*.parquet"))
    if not files:
        raise LmforgeError(f"{directory}: no part-*.parquet shards (run the mix stage first)")
    return pa_arrow.concat_tables(pq.read_table(f, columns=columns) for f in files)
