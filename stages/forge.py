"""The `forge` stage: `python -m stages.forge` (dvc.yaml runs it). See lmforge.forge.stage."""

from lmforge.forge.stage import ForgeConfig, run
from stages.wrapper import main

if __name__ == "__main__":
    main("forge", ForgeConfig, run)
