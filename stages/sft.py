"""The `sft` stage: `python -m stages.sft` (dvc.yaml runs it). See lmforge.sft."""

from lmforge.sft import SFTConfig, run
from stages.wrapper import main

if __name__ == "__main__":
    main("sft", SFTConfig, run, data_parallel=True)
