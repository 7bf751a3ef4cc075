"""The `tokenizer` stage: `python -m stages.tokenizer` (dvc.yaml runs it). See lmforge.tokenizer."""

from lmforge.tokenizer import TokenizerConfig, run
from stages.wrapper import main

if __name__ == "__main__":
    main("tokenizer", TokenizerConfig, run)
