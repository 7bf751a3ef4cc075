"""The `pretrain` stage: `python -m stages.pretrain` (dvc.yaml runs it). See lmforge.pretrain."""

from lmforge.pretrain import PretrainConfig, run
from stages.wrapper import main

if __name__ == "__main__":
    main("pretrain", PretrainConfig, run, data_parallel=True)
