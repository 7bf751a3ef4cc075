"""The pipeline's report: results against baselines, plots, lineage and the audit head, as
Markdown and as self-contained HTML. The stage is lmforge.report.stage; see its docstring."""
