"""pandera schemas of the tables the data stages write (checked before every write)."""

from __future__ import annotations

from collections.abc import Sequence

import pandera.pandas as pa


def mix_shard(sources: Sequence[str]) -> pa.DataFrameSchema:
    return pa.DataFrameSchema(
        {
            "id": pa.Column(str, unique=True, nullable=False),
            "source": pa.Column(str, pa.Check.isin(list(sources)), nullable=False),
            "text": pa.Column(str, pa.Check.str_length(min_value=1), nullable=False),
        },
        strict=True,
        ordered=True,
    )


DROPPED = pa.DataFrameSchema(
    {
        "id": pa.Column(str, nullable=False),
        "source": pa.Column(str, nullable=False),
        "reason": pa.Column(str, nullable=False),
        "duplicate_of": pa.Column(str, nullable=True),
    },
    strict=True,
    ordered=True,
)
