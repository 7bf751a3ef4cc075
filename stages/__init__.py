"""One thin module per DAG stage (`python -m stages.<name>`), all sharing `stages.wrapper`."""
