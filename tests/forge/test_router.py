"""Routing: a prompt naming a delta's subject activates it; anything else runs the bare base,
bit for bit."""

from __future__ import annotations

import pytest
import torch

from lmforge.forge import facts
from lmforge.forge.evaluate import encode, pad
from lmforge.forge.routed import Routed
from lmforge.forge.router import Router, subject_keys
from lmforge.weights import load_model
from tests.forge.helpers import random_delta

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_routes_by_subject_top_k_and_min_similarity(model_dir, enc) -> None:  # type: ignore[no-untyped-def]
    model, _ = load_model(model_dir)
    inv = facts.invented(20, 1)
    keys = {"a": subject_keys(model, enc, [f.subject for f in inv[:10]]),
            "b": subject_keys(model, enc, [f.subject for f in inv[10:]])}
    router = Router.for_model(model, keys, top_k=1, min_similarity=0.98)
    ids = encode(enc, inv[3].paraphrase_prompts()[0])[0]
    assert router.route(ids) == ["a"] and router.scores(ids)["a"] > 0.999
    assert router.route(encode(enc, inv[12].prompts()[1])[0]) == ["b"]
    assert router.route(encode(enc, "The capital of France is")[0]) == []
    two = encode(enc, f"{inv[0].subject} met {inv[15].subject} and")[0]
    assert router.route(two) in (["a"], ["b"])
    assert sorted(Router.for_model(model, keys, top_k=2, min_similarity=0.98).route(two)) == ["a", "b"]


def test_no_match_gives_the_base_output_exactly(model_dir, enc) -> None:  # type: ignore[no-untyped-def]
    model, _ = load_model(model_dir)
    inv = facts.invented(10, 2)
    d = random_delta(model, 3)
    routed = Routed(model, {"d": d}, Router.for_model(model, {"d": subject_keys(model, enc, [f.subject for f in inv])},
                                                      top_k=2, min_similarity=0.98))
    unrelated = ["The capital of France is", "A dog is a kind of", "In the beginning God created"]
    named = [inv[0].prompts()[0]]
    x = torch.from_numpy(pad([encode(enc, p)[0] for p in unrelated + named]))
    with torch.no_grad():
        out, base = routed(x), model(x)
    assert routed.last_active == [[], [], [], ["d"]]
    assert torch.equal(out[:3], base[:3])          # routed to nothing: the base, bit for bit
    assert not torch.equal(out[3:], base[3:])      # routed to the delta: changed
