"""lmforge: raw text to a released language model through one reproducible, auditable DAG.

The library knows nothing of DVC, Prefect or params.yaml paths: it takes typed configs and
paths and returns results. `stages/` wraps it for the DAG; `lmforge --help` lists the CLI.
"""

__version__ = "0.1.0"

import os as _os

# Bit-identical reruns on CPU: neither MKL nor OpenMP may choose a different number of threads
# from one call, or one run, to the next (a different split changes the order of floating-point
# sums). Set before torch loads its BLAS; an explicit setting in the environment wins.
for _key in ("MKL_DYNAMIC", "OMP_DYNAMIC"):
    _os.environ.setdefault(_key, "FALSE")
