"""The order in which the Prefect flow runs dvc.yaml's stages, read with DVC's Python API.

DVC builds the graph (from each stage's deps and outs), so the flow and `dvc repro` cannot
disagree about what depends on what. Try it: `python -c "from pipelines.graph import plan;
print([s.name for s in plan('.')])"` from the repo root.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import networkx as nx

from lmforge.errors import ConfigError
from stages.dag import DVC_FILE, load_stages


@dataclass(frozen=True)
class PlannedStage:
    """One stage of the root dvc.yaml, as the flow needs it."""

    name: str
    runner: str  # 'cpu' | 'gpu', from meta.runner
    gpus: int
    upstream: tuple[str, ...]  # root dvc.yaml stages this one depends on directly
    # Every DVC target this stage reads from (stages and .dvc files alike): what must be on
    # the DVC remote before a worker elsewhere can run it.
    dep_targets: tuple[str, ...]


def _dependency_graph(root: Path) -> tuple[nx.DiGraph, dict[object, str], set[object]]:
    """DVC's stage graph (edge: stage -> what it depends on), with each node's DVC address
    and the set of nodes that are stages of `root/dvc.yaml`."""
    from dvc.repo import Repo  # ~1 s import: only when a plan is made
    from dvc.stage import PipelineStage

    dvc_file = (root / DVC_FILE).resolve()
    with Repo(str(root)) as repo:
        graph = repo.index.graph
        address: dict[object, str] = {}
        own = set()
        for node in graph.nodes:
            # Stage.addressing is relative to the process's cwd; the dvc commands run in root.
            path = Path(node.dvcfile.path).resolve()
            if isinstance(node, PipelineStage):
                if path == dvc_file:
                    own.add(node)
                    address[node] = node.name
                else:
                    address[node] = f"{path.relative_to(root).as_posix()}:{node.name}"
            else:
                address[node] = path.relative_to(root).as_posix()
    return graph, address, own


def plan(root: str | Path, only: Sequence[str] | None = None) -> list[PlannedStage]:
    """The root dvc.yaml's stages upstream first, ties broken by their order in dvc.yaml.

    With `only`, just those stages and everything they depend on. Stages of other dvc.yaml
    files and `.dvc` files are not run by the flow (they are data sources or other
    pipelines); they still count as dependencies.
    """
    root = Path(root).resolve()
    specs = load_stages(root)
    graph, address, own = _dependency_graph(root)
    by_name = {address[n]: n for n in own}
    missing = [s for s in specs if s not in by_name]
    if missing:  # load_stages and DVC read the same file; a mismatch means a DVC parse quirk
        raise ConfigError(f"{root / DVC_FILE}: DVC does not see stage(s) {', '.join(missing)}")

    if only:
        unknown = [s for s in only if s not in by_name]
        if unknown:
            raise ConfigError(
                f"no stage named {', '.join(repr(u) for u in unknown)} in {root / DVC_FILE} "
                f"(stages: {', '.join(specs)})"
            )
        keep = set()
        for s in only:
            node = by_name[s]
            keep.add(node)
            keep.update(n for n in nx.descendants(graph, node) if n in own)  # descendants = upstream
    else:
        keep = set(own)

    position = {name: i for i, name in enumerate(specs)}
    # Reversed edges point upstream -> downstream; lexicographic order makes ties follow
    # dvc.yaml, so the same file always gives the same order.
    sub = graph.subgraph(keep).reverse(copy=True)
    order = nx.lexicographical_topological_sort(sub, key=lambda n: position[address[n]])
    planned = []
    for node in order:
        name = address[node]
        deps = sorted(graph.successors(node), key=lambda n: address[n])
        planned.append(
            PlannedStage(
                name=name,
                runner=specs[name].runner,
                gpus=specs[name].gpus,
                upstream=tuple(address[d] for d in deps if d in own),
                dep_targets=tuple(address[d] for d in deps),
            )
        )
    return planned
