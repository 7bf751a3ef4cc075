"""Contract tests of the DAG: one name per stage everywhere, and every output cacheable."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from lmforge.config import StageConfig
from stages import dag

ROOT = Path(__file__).resolve().parent.parent
DVC = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
PARAMS = yaml.safe_load((ROOT / "params.yaml").read_text())
SHARED_CODE = ("stages/wrapper.py", "stages/dag.py", "lib/lmforge/atomic.py", "lib/lmforge/config.py",
               "lib/lmforge/digest.py")


@pytest.mark.parametrize("name", list(DVC))
def test_one_name_per_stage(name: str) -> None:
    st = DVC[name]
    assert st["cmd"] == f"python -m stages.{name}"
    assert (ROOT / "stages" / f"{name}.py").exists()
    assert name in PARAMS and st["params"] == [name]
    assert st["meta"]["runner"] in ("cpu", "gpu")
    spec = dag.load_stage(ROOT, name)
    assert spec.all_outs and all(o.startswith(f"data/{name}/") for o in spec.all_outs)
    assert f"data/{name}/metrics.json" in spec.metrics
    assert f"stages/{name}.py" in spec.deps
    # the shared code that writes metrics.json and publishes outputs must re-run a stage when it changes
    assert set(SHARED_CODE) <= set(spec.deps), set(SHARED_CODE) - set(spec.deps)
    # the wrapper writes a declared curves/ output with lmforge.curves: its changes must re-run the stage
    if f"data/{name}/curves" in spec.plots:
        assert "lib/lmforge/curves.py" in spec.deps


def test_the_report_reads_every_stage_and_the_curves_plots_exist() -> None:
    """The report closes the DAG: it reads every other stage's metrics.json and every curves/ output,
    and dvc.yaml's top-level plots only name files that the curves outputs hold."""
    report = dag.load_stage(ROOT, "report")
    specs = dag.load_stages(ROOT)
    assert list(specs)[-1] == "report"
    for name, spec in specs.items():
        if name != "report":
            assert f"data/{name}/metrics.json" in report.deps, name
            assert all(p in report.deps for p in spec.plots), name
    top = yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    curves = {p for s in specs.values() for p in s.plots if p.endswith("/curves")}
    for plot in top:
        (definition,) = plot.values()
        assert all(str(Path(f).parent) in curves for f in definition["y"]), plot


@pytest.mark.parametrize("name", list(DVC))
def test_outputs_stay_cacheable(name: str) -> None:
    """cache: false, persist or always_changed would defeat the run-cache hand-back."""
    st = DVC[name]
    assert not st.get("always_changed")
    for entry in st.get("outs", []) + st.get("metrics", []) + st.get("plots", []):
        if isinstance(entry, dict):
            opts = next(iter(entry.values())) or {}
            assert opts.get("cache", True) and not opts.get("persist"), entry


@pytest.mark.parametrize("name", list(DVC))
def test_params_section_is_a_valid_config(name: str) -> None:
    import importlib

    from stages.wrapper import main  # noqa: F401  (the stage module must import cleanly)

    module = importlib.import_module(f"stages.{name}")
    configs = [v for v in vars(module).values() if isinstance(v, type) and issubclass(v, StageConfig)]
    assert len(configs) == 1
    configs[0].model_validate(PARAMS[name])


def test_params_sections_are_stages_or_pipeline() -> None:
    assert set(PARAMS) == set(DVC) | {"pipeline"}


def test_dag_is_a_chain_in_declared_order() -> None:
    from pipelines.graph import plan

    assert [s.name for s in plan(ROOT)] == list(DVC)
