"""lmforge: raw text to a released language model through one reproducible, auditable DAG.

The library knows nothing of DVC, Prefect or params.yaml paths: it takes typed configs and
paths and returns results. `stages/` wraps it for the DAG; `lmforge --help` lists the CLI.
"""

__version__ = "0.1.0"
