"""Shared test set-up: hermetic, offline, nothing written outside tmp dirs."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"

for p in (ROOT / "lib", ROOT):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))


@pytest.fixture(autouse=True, scope="session")
def _offline_env(tmp_path_factory: pytest.TempPathFactory) -> None:
    home = tmp_path_factory.mktemp("home")
    os.environ.update(
        {
            "HF_HOME": str(home / "hf"),
            "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1",
            "PREFECT_HOME": str(home / "prefect"),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
            "MLFLOW_DISABLE_TELEMETRY": "true",
            "DVC_NO_ANALYTICS": "1",
            "TOKENIZERS_PARALLELISM": "false",
        }
    )


@pytest.fixture(scope="module")
def one_torch_thread() -> Iterator[None]:
    """Tiny tensors gain nothing from threads, and on a busy machine they lose a lot. A module
    opts in with `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def math_encoder(tmp_path_factory: pytest.TempPathFactory):  # type: ignore[no-untyped-def]
    """A small tokenizer trained on the generated chat sets (word problems, arithmetic, drills)."""
    from lmforge.data.chats import ChatSet, build
    from lmforge.tokenizer import TokenizerConfig, load_encoder, save, train

    sets = [ChatSet(name="w", kind="math_word", n=40), ChatSet(name="a", kind="math_arithmetic", n=40),
            ChatSet(name="d", kind="drill", n=200, max_operand=20)]
    texts = [" ".join(t for _, t in c.turns) for c in build(sets, 1)]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    save(train(texts * 2, TokenizerConfig(vocab_size=500)), out)
    return load_encoder(out)


@pytest.fixture(scope="session")
def ci_dag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of this repo on the ci profile after a whole `dvc repro`: the reference run the
    end-to-end tests inspect and other drivers (the Prefect flow, deployments) are compared with."""
    import yaml

    from tests.pipeline_repo import copy_repo, run

    r = copy_repo(tmp_path_factory.mktemp("e2e") / "repo")
    proc = run(r, "dvc", "repro")
    for stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]:
        assert f"Running stage '{stage}'" in proc.stdout, stage
    return r
