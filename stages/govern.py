"""The `govern` stage: `python -m stages.govern` (dvc.yaml runs it). See lmforge.govern."""

from lmforge.govern import GovernConfig, run
from stages.wrapper import main

if __name__ == "__main__":
    main("govern", GovernConfig, run, data_parallel=True)
