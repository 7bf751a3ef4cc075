"""The `rl` stage: `python -m stages.rl` (dvc.yaml runs it). See lmforge.rl.stage."""

from lmforge.rl.stage import RLConfig, run
from stages.wrapper import main

if __name__ == "__main__":
    main("rl", RLConfig, run, data_parallel=True)
