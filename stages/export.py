"""The `export` stage: `python -m stages.export` (dvc.yaml runs it). See lmforge.export.stage."""

from lmforge.export.stage import ExportConfig, run
from stages.wrapper import main

if __name__ == "__main__":
    main("export", ExportConfig, run)
