"""The `mix` stage: `python -m stages.mix` (dvc.yaml runs it). See lmforge.data.mix."""

from lmforge.data.mix import MixConfig, run
from stages.wrapper import main

if __name__ == "__main__":
    main("mix", MixConfig, run)
