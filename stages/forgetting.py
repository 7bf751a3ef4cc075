"""The `forgetting` stage: `python -m stages.forgetting` (dvc.yaml runs it). See lmforge.forgetting.stage."""

from lmforge.forgetting.stage import ForgettingConfig, run
from stages.wrapper import main

if __name__ == "__main__":
    main("forgetting", ForgettingConfig, run)
