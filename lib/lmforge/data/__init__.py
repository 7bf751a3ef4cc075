"""Data blocks of the `mix` stage: sources, normalisation, filters, dedup, mixing, shards."""
