"""Forging through the one training loop: the base stays frozen and the delta learns the facts;
the data source resumes where it stopped."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lmforge.forge import facts, forging
from lmforge.forge.delta import applied, weights_sha256
from lmforge.forge.evaluate import fact_pairs, hits
from lmforge.train.config import TrainConfig
from lmforge.train.dist import Dist
from lmforge.weights import load_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TRAIN = TrainConfig(seq_len=32, micro_batch=8, global_batch=8, steps=200, optim={"matrix": "adamw", "matrix_lr": 0.02},
                    schedule={"decay_frac": 0.3}, eval_every=1000, ckpt_every=1000, progress=False)


def test_a_delta_learns_its_facts_and_leaves_the_base_untouched(model_dir, enc) -> None:  # type: ignore[no-untyped-def]
    model, _ = load_model(model_dir)
    digest = weights_sha256(model)
    fs = facts.invented(4, 11)
    before = hits(lambda x, _n: model(x), enc, fact_pairs(fs, "templates"))
    cfg = forging.DeltaConfig(rank=8, alpha=16, kl_weight=1.0, anchor_fraction=0.25)
    delta, res = forging.forge(model, enc, fs, ["The capital of France is", "A dog is a kind of"], cfg, TRAIN,
                               dist=Dist(0, 1, 0, torch.device("cpu")), seed=0)
    with applied(model, [delta]):
        after = hits(lambda x, _n: model(x), enc, fact_pairs(fs, "templates"))
    assert sum(before) == 0 and all(after), (before, after)
    assert res.train_loss < 0.5 * np.log(enc.n_vocab)  # from about log(vocab) at the start
    assert weights_sha256(model) == digest
    assert not any(p.requires_grad for p in model.parameters())


def test_fact_rows_mask_all_but_the_object_and_resume_exactly(enc) -> None:  # type: ignore[no-untyped-def]
    fs = facts.invented(3, 2)
    rows, tgts = forging.fact_rows(enc, fs)
    assert len(rows) == sum(len(f.templates) for f in fs)
    first = enc.encode_ordinary(fs[0].target)
    assert [t for t in tgts[0] if t != -1] == first
    data = forging.FactRows(rows, tgts, forging.anchor_rows(enc, ["Hello there", "A b c"]), 0.25, seed=1)
    data.next_step(8, 4)
    state = data.state_dict()
    a = data.next_step(8, 4)
    again = forging.FactRows(rows, tgts, forging.anchor_rows(enc, ["Hello there", "A b c"]), 0.25, seed=1)
    again.load_state_dict(state)
    b = again.next_step(8, 4)
    for x, y in zip(a, b, strict=True):
        assert all(torch.equal(x[k], y[k]) for k in x)
    anchors = torch.cat([m["anchor"] for m in a])
    assert int(anchors.any(1).sum()) == 2 and np.all([(m["targets"][m["anchor"]] == -1).all() for m in a])
