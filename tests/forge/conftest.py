"""A tiny model directory (random weights, a tokenizer trained on fact prompts) for forge tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from lmforge.forge import facts
from tests.forge.helpers import REAL, tiny


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from lmforge.tokenizer import TokenizerConfig, save, train
    from lmforge.weights import save_model

    real = facts.load(REAL)
    texts = [p + f.target for f in real + facts.invented(60, 1) for p in f.prompts() + f.paraphrase_prompts()]
    root = tmp_path_factory.mktemp("forge-model")
    save(train(texts, TokenizerConfig(vocab_size=512)), root / "tok")
    save_model(tiny(512), root / "model", tokenizer_dir=root / "tok")
    return root / "model"


@pytest.fixture(scope="session")
def enc(model_dir: Path):  # type: ignore[no-untyped-def]
    from lmforge.tokenizer import load_encoder
    from lmforge.weights import tokenizer_path

    return load_encoder(tokenizer_path(model_dir))
