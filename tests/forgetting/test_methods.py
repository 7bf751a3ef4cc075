"""The benchmark's methods: the EWC Fisher against brute force, the EWC penalty, replay's
sampling proportions, the persistence weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lmforge.forgetting import persistence
from lmforge.forgetting.ewc import EWC, diagonal_fisher
from lmforge.forgetting.replay import replay, split_counts
from lmforge.model import GPT, ModelConfig
from lmforge.tokens import TokenSplit
from lmforge.train.data import PackedRows

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig(vocab_size=24, n_layer=1, d_model=16, n_head=2, n_kv_head=1, head_dim=8, d_mlp=32,
                           max_seq_len=16))


def rows(n: int, length: int = 9, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 24, size=(n, length))


def test_fisher_matches_brute_force_finite_differences() -> None:
    model, data = tiny(), rows(3)
    fisher = diagonal_fisher(model, data, torch.device("cpu"))
    params = dict(model.named_parameters())
    assert set(fisher) == set(params)
    rng = np.random.default_rng(1)
    eps = 1e-2
    checked = 0
    for name, p in params.items():
        for flat in rng.choice(p.numel(), size=min(4, p.numel()), replace=False):
            grads = []
            for row in torch.from_numpy(data):
                losses = []
                for sign in (1, -1):
                    with torch.no_grad():
                        p.view(-1)[flat] += sign * eps
                        logits = model(row[None, :-1])
                        losses.append(float(F.cross_entropy(logits[0].double(), row[1:])))
                        p.view(-1)[flat] -= sign * eps
                grads.append((losses[0] - losses[1]) / (2 * eps))
            brute = float(np.mean(np.square(grads)))
            assert float(fisher[name].view(-1)[flat]) == pytest.approx(brute, rel=3e-2, abs=1e-6), (name, flat)
            checked += 1
    assert checked > 20


def test_fisher_is_a_per_row_average_not_a_batch_gradient() -> None:
    model, data = tiny(), rows(4)
    both = diagonal_fisher(model, data, torch.device("cpu"))
    halves = [diagonal_fisher(model, data[:2], torch.device("cpu")), diagonal_fisher(model, data[2:], torch.device("cpu"))]
    for name in both:
        torch.testing.assert_close(both[name], (halves[0][name] + halves[1][name]) / 2)


def test_ewc_penalty_is_the_fisher_weighted_distance_and_online_decays() -> None:
    model, data = tiny(), rows(3)
    ewc = EWC(lam=2.0)
    ewc.consolidate(model, data, torch.device("cpu"))
    assert float(ewc.penalty().detach()) == 0.0  # at the anchor
    star, fisher = ewc.anchors[0]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    want = 0.5 * 2.0 * sum(float((fisher[n] * 0.01).sum()) for n in fisher)
    assert float(ewc.penalty().detach()) == pytest.approx(want, rel=1e-4)
    ewc.penalty().backward()  # the penalty pulls every weight with a Fisher value back to theta*
    name = max(fisher, key=lambda n: float(fisher[n].sum()))
    grad = dict(model.named_parameters())[name].grad
    torch.testing.assert_close(grad, 2.0 * fisher[name] * 0.1, rtol=1e-4, atol=1e-8)

    per_task, online = EWC(1.0, "per_task"), EWC(1.0, "online", gamma=0.5)
    for e in (per_task, online):
        e.consolidate(model, data, torch.device("cpu"))
        e.consolidate(model, data[:1], torch.device("cpu"))
    assert len(per_task.anchors) == 2 and len(online.anchors) == 1
    first, second = diagonal_fisher(model, data, torch.device("cpu")), diagonal_fisher(model, data[:1], torch.device("cpu"))
    for n, f in online.anchors[0][1].items():
        torch.testing.assert_close(f, 0.5 * first[n] + second[n])


def _split(value: int, n: int) -> TokenSplit:
    tokens = np.full(n, value, dtype=np.uint16)
    tokens[::32] = 0  # a BOS every 32 tokens
    offsets = np.arange(0, n + 1, 32, dtype=np.int64)
    return TokenSplit(tokens=tokens, offsets=offsets, index={}, bos_id=0)


def _origin(batches: list[dict[str, torch.Tensor]]) -> np.ndarray:
    """Where each row of a step came from, read off its content: 9 new, 1..3 a domain's memory."""
    return torch.cat([torch.cat([b["inputs"], b["targets"][:, -1:]], 1) for b in batches]).max(1).values.numpy()


def test_replay_takes_its_fraction_spread_evenly_over_earlier_domains() -> None:
    memories = [np.full((10, 9), d + 1, dtype=np.int64) for d in range(3)]
    data = replay(PackedRows(_split(9, 4096), 8, seed=0), memories, fraction=0.25, seed=5)
    counts = np.zeros(10, dtype=int)
    for _ in range(30):
        batches = data.next_step(16, 4)
        assert len(batches) == 4 and all(b["inputs"].shape == (4, 8) for b in batches)
        origin = _origin(batches)
        assert (origin != 9).sum() == 4  # exactly round(0.25 x 16) replayed rows every step
        assert len({tuple(_origin([b])) for b in batches}) > 1  # shuffled: not all old rows in one micro-batch
        counts += np.bincount(origin, minlength=10)
    assert counts[9] == 30 * 12 and list(counts[1:4]) == [40, 40, 40]  # 120 replayed rows, a third each


def test_replay_split_counts_and_resume() -> None:
    assert split_counts(4, 3, 0) == [2, 1, 1] and split_counts(4, 3, 1) == [1, 2, 1] and split_counts(4, 3, 2) == [1, 1, 2]
    assert split_counts(0, 2, 5) == [0, 0]
    memories = [np.arange(90).reshape(10, 9)]
    a = replay(PackedRows(_split(9, 4096), 8, seed=0), memories, 0.5, seed=1)
    a.next_step(8, 8)
    state = a.state_dict()
    want = a.next_step(8, 8)[0]["inputs"]
    b = replay(PackedRows(_split(9, 4096), 8, seed=0), memories, 0.5, seed=1)
    b.load_state_dict(state)
    torch.testing.assert_close(b.next_step(8, 8)[0]["inputs"], want)
    first = replay(PackedRows(_split(9, 4096), 8, seed=0), [], 0.5, seed=1)  # the first domain: nothing to replay
    assert isinstance(first, PackedRows)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        replay(PackedRows(_split(9, 4096), 8, seed=0), memories, 1.0, seed=1)


def test_persistence_weights() -> None:
    logits = torch.tensor([[[4.0, 0.0, 0.0], [0.0, 4.0, 0.0], [1.0, 1.0, 0.9], [0.0, 0.0, 0.0]]])
    targets = torch.tensor([[0, 0, 2, -1]])  # top choice, badly under-predicted, unsure, ignored
    cfg = persistence.PersistenceConfig(persist=1.0, push=1.0, power=2.0)
    w = persistence.weights(logits, targets, cfg)
    assert float(w[0, 3]) == 0.0 and float(w[0, :3].mean()) == pytest.approx(1.0)
    assert w[0, 0] > w[0, 2] and w[0, 1] > w[0, 2]  # both ends weigh more than the unsure middle
    plain = persistence.weights(logits, targets, persistence.PersistenceConfig(persist=0.0, push=0.0))
    torch.testing.assert_close(plain, torch.tensor([[1.0, 1.0, 1.0, 0.0]]))
    only_persist = persistence.weights(logits, targets, persistence.PersistenceConfig(persist=1.0, push=0.0))
    assert only_persist[0, 0] > only_persist[0, 2] > only_persist[0, 1]


def test_persistence_with_zero_weights_is_cross_entropy() -> None:
    model = tiny()
    batch = {"inputs": torch.from_numpy(rows(2))[:, :-1], "targets": torch.from_numpy(rows(2))[:, 1:]}
    loss = persistence.objective(persistence.PersistenceConfig(persist=0.0, push=0.0)).loss(model, batch)
    torch.testing.assert_close(loss, model(batch["inputs"], batch["targets"]) * batch["targets"].numel(),
                               rtol=1e-5, atol=1e-4)
