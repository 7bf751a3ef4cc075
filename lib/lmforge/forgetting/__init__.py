"""Forgetting: the continual benchmark (methods compared by GEM's ACC / BWT / FWT), the pipeline's
retention table and the release gate. The stage is lmforge.forgetting.stage."""
