"""The `report` stage: `python -m stages.report` (dvc.yaml runs it). See lmforge.report.stage."""

from lmforge.report.stage import ReportConfig, run
from stages.wrapper import main

if __name__ == "__main__":
    main("report", ReportConfig, run)
