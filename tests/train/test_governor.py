"""The governor: state changes at exactly the expected steps, real freezing in the training
loop, optimizer state kept across freeze -> awaken, the budget invariant, resume."""

from __future__ import annotations

import math
import os
import random
from typing import Any

import numpy as np
import pytest
import torch
from torch._dynamo.utils import counters

from lmforge.errors import ConfigError
from lmforge.model import GPT, ModelConfig
from lmforge.tokens import TokenSplit
from lmforge.train import optim
from lmforge.train.config import OptimConfig, TrainConfig
from lmforge.train.data import PackedRows
from lmforge.train.dist import Dist
from lmforge.train.evaluate import bits_per_byte
from lmforge.train.governor import (
    ACTIVE,
    AWAKENED,
    CONVERGED,
    COOLING,
    FROZEN,
    PENDING,
    Governor,
    GovernorConfig,
    allocate,
)
from lmforge.train.groups import GroupSpec, partition
from lmforge.train.loop import LM, fit
from tests.system import require

pytestmark = pytest.mark.usefixtures("one_torch_thread")
VOCAB = 64
CPU = Dist(0, 1, 0, torch.device("cpu"))
SPECS = [GroupSpec(name="a", level=0, patterns=["model.embed_tokens.*", "*norm.weight"]),
         GroupSpec(name="b", level=0, patterns=["lm_head.*"]),
         GroupSpec(name="c", level=1, patterns=["model.layers.*.self_attn.*"]),
         GroupSpec(name="d", level=2, patterns=["model.layers.*.mlp.*"])]


def gpt(seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_depth(2, VOCAB, aspect_ratio=32, head_dim=16, max_seq_len=32))


def governor(model: GPT, **cfg: Any) -> Governor:
    return Governor(GovernorConfig(**cfg), partition(model, SPECS))


def attach(gov: Governor, model: GPT, total: int = 1000) -> list[torch.optim.Optimizer]:
    opts = optim.build(model, OptimConfig(matrix="adamw"), model.config.d_model, split=gov.split())
    gov.attach(model, opts, total)
    return opts


def set_grads(gov: Governor, norms: dict[str, float]) -> None:
    """Give each trainable group a gradient of exactly the given norm."""
    for g in gov.groups:
        params = gov._params[g.name]
        n = sum(p.numel() for p in params)
        for p in params:
            p.grad = (torch.full_like(p, norms[g.name] / math.sqrt(n)) if p.requires_grad else None)


def drive(gov: Governor, norms: Any, steps: range) -> None:
    for step in steps:
        gov.before_step(step)
        set_grads(gov, {g.name: norms(step, g.name) for g in gov.groups})
        gov.before_update(step)
        gov.after_update(step)


def transitions(gov: Governor) -> list[tuple[int, str, str, str]]:
    return [(e["step"], e["group"], e["old"], e["new"]) for e in gov.events]


def test_transitions_happen_at_exactly_the_expected_steps() -> None:
    """EMA decay 0: the EMA is the latest norm, so every state change is predictable."""
    model = gpt()
    gov = governor(model, ema_decay=0.0, ref_steps=2, cool_ratio=0.8, converge_ratio=0.5, window=3,
                   awaken_tol=0.01, awaken_steps=2, force_at=[1.0, 1.0, 1.0], eval_cap=100, eval_window=1)
    attach(gov, model)
    assert {k: v.state for k, v in gov.states.items()} == {"a": ACTIVE, "b": ACTIVE, "c": PENDING, "d": PENDING}

    def norms(step: int, group: str) -> float:
        if group == "a":
            return 1.0 if step < 2 else 0.7 if step < 5 else 0.4
        if group == "b":
            return 1.0 if step < 2 else 0.7 if step < 5 else 0.9 if step == 5 else 0.4
        return 1.0

    drive(gov, norms, range(12))
    assert transitions(gov) == [
        (5, "a", ACTIVE, COOLING),       # ref 1.0 after 2 steps; 0.7 < 0.8 on steps 2, 3, 4
        (5, "b", ACTIVE, COOLING),
        (5, "c", PENDING, ACTIVE),       # every level-0 group cooled: level 1 starts
        (6, "b", COOLING, ACTIVE),       # 0.9 >= 0.8 on step 5
        (8, "a", COOLING, CONVERGED),    # 0.4 < 0.5 on steps 5, 6, 7
        (9, "b", ACTIVE, COOLING),       # 0.4 < 0.8 on steps 6, 7, 8
        (12, "b", COOLING, CONVERGED),   # 0.4 < 0.5 on steps 9, 10, 11
    ]
    assert gov.events[2]["signals"]["reason"] == "cooled"
    assert all(not p.requires_grad for name in ("a", "b") for p in gov._params[name])
    assert all(p.requires_grad for p in gov._params["c"]) and gov.states["d"].state == PENDING
    # a validation regression awakens the group that converged last (b), not a
    gov.on_eval(12, {"val_loss": 2.0})
    gov.on_eval(12, {"val_loss": 2.01})  # within awaken_tol: nothing
    gov.on_eval(12, {"val_loss": 2.1})
    assert transitions(gov)[-1] == (12, "b", CONVERGED, AWAKENED)
    assert gov.events[-1]["signals"]["val_loss"] == 2.1 and gov.events[-1]["signals"]["best_val_loss"] == 2.0
    assert all(p.requires_grad for p in gov._params["b"]) and gov.states["a"].state == CONVERGED
    drive(gov, norms, range(12, 14))
    assert transitions(gov)[-1] == (14, "b", AWAKENED, ACTIVE)  # after awaken_steps = 2
    assert all(s <= 1.0 + 1e-12 for s in gov.budget_sums) and len(gov.budget_sums) == 14


def drive_contributions(gov: Governor, contrib: Any, steps: range) -> None:
    """Every trainable group gets a gradient of norm 1 (ratio 1: the gradient signal never
    fires) and an update along it whose loss contribution g . (before - after) is exactly
    contrib(step, group)."""
    for step in steps:
        gov.before_step(step)
        set_grads(gov, dict.fromkeys(gov.states, 1.0))
        gov.before_update(step)
        with torch.no_grad():
            for g in gov.groups:
                for p in gov._params[g.name]:
                    if p.grad is not None:
                        p.sub_(contrib(step, g.name) * p.grad)  # |g| = 1 over the group
        gov.after_update(step)


def test_low_yield_cools_and_freezes_a_group_whose_gradient_has_not_shrunk() -> None:
    """EMA decay 0: a group whose updates buy little loss per gradient FLOP, compared with the
    others, cools and converges at exactly the expected steps; the gradient signal is silent."""
    model = gpt()
    settings = dict(ema_decay=0.0, ref_steps=2, cool_ratio=0.5, converge_ratio=0.5, window=3,
                    force_at=[0.0, 0.0, 0.0], eval_cap=100, eval_window=1)
    gov = governor(model, cool_yield=0.5, converge_yield=0.2, **settings)
    attach(gov, model)
    work = gov._work

    def contrib(step: int, group: str) -> float:  # per FLOP: 1 for a, b, c; d 1, then 0.2, then 0, then < 0
        scale = 1.0 if group != "d" or step < 2 else 0.2 if step < 5 else 0.0 if step < 8 else -0.1
        return scale * work[group] * 1e-5  # large enough for float32 weights to carry

    drive_contributions(gov, contrib, range(12))
    others = work["a"] + work["b"] + work["c"]
    assert 0.2 < 0.2 / ((others + 0.2 * work["d"]) / (others + work["d"])) < 0.5  # d's yield on steps 2..4
    assert transitions(gov) == [
        (0, "c", PENDING, ACTIVE),       # force_at 0: every level starts at once
        (0, "d", PENDING, ACTIVE),
        (5, "d", ACTIVE, COOLING),       # yield < 0.5 on steps 2, 3, 4 (judged from ref_steps on)
        (8, "d", COOLING, CONVERGED),    # yield 0 < 0.2 on steps 5, 6, 7
    ]
    assert gov.events[2]["signals"]["yield"] == pytest.approx(0.2 / ((others + 0.2 * work["d"]) / (others + work["d"])),
                                                              rel=1e-3)
    assert gov.events[2]["signals"]["ratio"] == pytest.approx(1.0)
    assert all(not p.requires_grad for p in gov._params["d"])
    assert all(gov.states[g].yld == pytest.approx(1.0, rel=1e-2) for g in "abc")  # the rate of the groups still training
    # the same run with the yield thresholds at 0 (the default): nothing moves
    model = gpt()
    off = governor(model, **settings)
    attach(off, model)
    drive_contributions(off, contrib, range(12))
    assert len(off.events) == 2 and off.states["d"].state == ACTIVE and off.states["d"].yld < 0  # still off


def test_levels_start_at_their_forced_fractions() -> None:
    model = gpt()
    gov = governor(model, cool_ratio=0.01, converge_ratio=0.01, force_at=[0.25, 0.5, 0.5])
    attach(gov, model, total=20)
    drive(gov, lambda step, group: 1.0, range(20))
    assert [(e["step"], e["group"]) for e in gov.events] == [(5, "c"), (10, "d")]
    assert all(e["signals"]["reason"] == "forced" and e["new"] == ACTIVE for e in gov.events)


@pytest.mark.parametrize("seed", range(20))
def test_allocate_keeps_floor_ceiling_and_budget(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 9)
    budget = rng.uniform(0.5, 2.0)
    floor = rng.uniform(0, budget / n)
    ceiling = rng.uniform(max(floor, budget / n * 0.5), budget)
    needs = {f"g{i}": rng.choice([0.0, rng.uniform(0, 5), rng.uniform(0, 0.01)]) for i in range(n)}
    shares = allocate(needs, budget, floor, ceiling)
    assert sum(shares.values()) <= budget * (1 + 1e-12)
    assert all(floor - 1e-12 <= s <= ceiling + 1e-12 for s in shares.values()), (shares, floor, ceiling)
    # the whole budget is shared out, unless every group with a need is at the ceiling
    needy = [g for g, v in needs.items() if v > 0] or list(needs)
    assert sum(shares.values()) == pytest.approx(budget) or all(shares[g] == pytest.approx(ceiling) for g in needy)
    # more need, no smaller share
    order = sorted(needs, key=needs.get)
    assert all(shares[a] <= shares[b] + 1e-12 for a, b in zip(order, order[1:], strict=False))


def test_bad_governor_settings_are_refused() -> None:
    for kw, msg in [({"cool_ratio": 1.5}, "cool_ratio must be in"), ({"converge_ratio": 0.9}, "converge_ratio must"),
                    ({"ema_decay": 1.0}, "ema_decay"), ({"force_at": [0.5, 0.2, 0.9]}, "must not decrease"),
                    ({"share_floor": 0.7}, "share_floor"), ({"window": 0}, "window must be >= 1"),
                    ({"cool_yield": 1.0}, "cool_yield must be in"),
                    ({"cool_yield": 0.3, "converge_yield": 0.4}, "converge_yield must be in")]:
        with pytest.raises(ValueError, match=msg):
            GovernorConfig(**kw)
    model = gpt()
    gov = governor(model, share_floor=0.3)  # 4 groups x 0.3 > budget 1.0
    with pytest.raises(ConfigError, match="share_floor 0.3 x 4 groups exceeds budget"):
        attach(gov, model)


# --- in the training loop ------------------------------------------------------------------------

def split(seed: int = 0, n_docs: int = 200) -> TokenSplit:
    rng = np.random.default_rng(seed)
    docs = [np.concatenate([[0], rng.integers(1, VOCAB, rng.integers(8, 40))]) for _ in range(n_docs)]
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    return TokenSplit(tokens=np.concatenate(docs).astype(np.uint16), offsets=offsets, index={}, bos_id=0)


def train(model: GPT, plugin: Governor | None, steps: int, ckpt_dir: Any = None, **kw: Any) -> Any:
    cfg = TrainConfig(seq_len=16, micro_batch=4, global_batch=8, steps=steps, progress=False, ckpt_every=5, **kw)
    rows = PackedRows(split(seed=1), 16, seed=1).take(4)
    return fit(model, LM, PackedRows(split(), 16, seed=3), cfg, dist=CPU, total_steps=steps,
               d_model=model.config.d_model, ckpt_dir=ckpt_dir, plugin=plugin,
               evaluate=lambda m: bits_per_byte(m, rows, np.ones(VOCAB, dtype=np.int64), CPU, micro_batch=4))


class Spy(Governor):
    """The real governor, plus checks after every backward, and forced state changes."""

    def __init__(self, *args: Any, force: dict[int, tuple[str, str]] | None = None, **kw: Any):
        super().__init__(*args, **kw)
        self.force = force or {}
        self.seen: dict[int, dict[str, Any]] = {}
        self.frozen_sets: set[frozenset[str]] = set()  # the sets of frozen groups steps ran with

    def before_update(self, step: int) -> None:
        self.frozen_sets.add(frozenset(g.name for g in self.groups if self.states[g.name].state in FROZEN))
        for g in self.groups:
            frozen = self.states[g.name].state in FROZEN
            for p in self._params[g.name]:
                assert (p.grad is None) == frozen, (step, g.name)  # frozen: autograd computed nothing
        super().before_update(step)

    def after_update(self, step: int) -> bool:
        want = super().after_update(step)
        if step + 1 in self.force:
            group, state = self.force[step + 1]
            self._move(group, state, step + 1)
            self.apply()
            opt_state = {id(p): {k: v.clone() for k, v in self.opts_state(p).items()} for p in self._params[group]}
            self.seen[step + 1] = {"bytes": [p.detach().clone() for p in self._params[group]], "opt": opt_state}
        return want

    def opts_state(self, p: torch.nn.Parameter) -> dict[str, torch.Tensor]:
        return {k: v for opt in self._opts for k, v in opt.state.get(p, {}).items() if isinstance(v, torch.Tensor)}

    def attach(self, model: torch.nn.Module, opts: list[torch.optim.Optimizer], total_steps: int) -> None:
        self._opts = opts
        super().attach(model, opts, total_steps)


def test_frozen_groups_get_no_gradient_and_keep_their_bytes() -> None:
    """Levels 1-2 stay PENDING (never forced) and the head is frozen at step 4: no gradient is
    ever computed for them (Spy checks after every backward) and their bytes never change."""
    model = gpt()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    gov = Spy(GovernorConfig(force_at=[1.0, 1.0, 1.0], awaken_tol=10.0), partition(model, SPECS), force={4: ("b", CONVERGED)})
    train(model, gov, steps=12)
    after = dict(model.named_parameters())
    for name in [n for g in gov.groups if g.name in ("c", "d") for n in g.params]:
        assert torch.equal(after[name], start[name]), name
    assert torch.equal(after["lm_head.weight"], gov.seen[4]["bytes"][0])
    assert not torch.equal(after["lm_head.weight"], start["lm_head.weight"])  # it trained before step 4
    assert not torch.equal(after["model.embed_tokens.weight"], start["model.embed_tokens.weight"])


@pytest.mark.parametrize("matrix", ["muon", "adamw"])
def test_optimizer_state_survives_freeze_and_awaken(matrix: str) -> None:
    model = gpt()
    gov = Spy(GovernorConfig(force_at=[0.0, 0.0, 0.0], awaken_steps=100, awaken_tol=10.0), partition(model, SPECS),
              force={3: ("d", CONVERGED), 7: ("d", AWAKENED)})
    train(model, gov, steps=9, optim=OptimConfig(matrix=matrix))
    frozen, woken = gov.seen[3]["opt"], gov.seen[7]["opt"]
    assert frozen and frozen.keys() == woken.keys()
    for pid in frozen:
        assert frozen[pid].keys() == woken[pid].keys()
        for k in frozen[pid]:
            assert torch.equal(frozen[pid][k], woken[pid][k]), k  # untouched while frozen, not reset
    # trained again after awakening: its moments moved on from where they were
    p = gov._params["d"][0]
    moment = "momentum_buffer" if matrix == "muon" else "exp_avg"
    assert not torch.equal(gov.opts_state(p)[moment], frozen[id(p)][moment])
    if matrix == "adamw":
        assert float(gov.opts_state(p)["step"]) == float(frozen[id(p)]["step"]) + 2  # steps 8 and 9 only


def test_budget_invariant_holds_on_every_step_of_a_real_run() -> None:
    model = gpt()
    gov = Governor(GovernorConfig(ema_decay=0.5, ref_steps=2, cool_ratio=0.95, converge_ratio=0.9, window=2,
                                  share_floor=0.05, share_ceiling=0.4, force_at=[0.1, 0.2, 0.3]),
                   partition(model, SPECS))
    train(model, gov, steps=30)
    assert len(gov.budget_sums) == 30
    assert all(0 < s <= gov.cfg.budget * (1 + 1e-12) for s in gov.budget_sums)
    assert 0 < gov.skipped_fraction < 1


def test_a_resumed_governed_run_equals_an_uninterrupted_one(tmp_path: Any) -> None:
    cfg = GovernorConfig(ema_decay=0.5, ref_steps=2, cool_ratio=0.98, converge_ratio=0.95, window=2,
                         force_at=[0.1, 0.2, 0.3])
    m1 = gpt()
    g1 = Governor(cfg, partition(m1, SPECS))
    train(m1, g1, steps=20, ckpt_dir=tmp_path)  # leaves checkpoints at steps 5, 10, 15
    m2 = gpt()
    g2 = Governor(cfg, partition(m2, SPECS))
    result = train(m2, g2, steps=20, ckpt_dir=tmp_path)
    assert result.resumed_from == 15
    assert g2.events == g1.events and g2.budget_sums == g1.budget_sums and g1.events
    for (n, a), b in zip(m1.state_dict().items(), m2.state_dict().values(), strict=True):
        assert torch.equal(a, b), n


def test_a_resumed_governor_keeps_the_groups_order(tmp_path: Any) -> None:
    """state.json sorts keys: a resume must not reorder the states, or a sum over them (a step's
    budget_sum, governance.json's max_sum) can differ in its last bit from an uninterrupted run's."""
    specs = [GroupSpec(name=f"{name}_{i}", level=s.level, patterns=s.patterns)
             for i, (name, s) in enumerate(zip("zyxw", SPECS, strict=True))]  # names not in sorted order
    cfg = GovernorConfig(ema_decay=0.5, ref_steps=2, cool_ratio=0.98, converge_ratio=0.95, window=2,
                         force_at=[0.1, 0.2, 0.3])
    m1 = gpt()
    g1 = Governor(cfg, partition(m1, specs))
    train(m1, g1, steps=20, ckpt_dir=tmp_path)
    m2 = gpt()
    g2 = Governor(cfg, partition(m2, specs))
    assert train(m2, g2, steps=20, ckpt_dir=tmp_path).resumed_from == 15
    assert list(g2.states) == list(g1.states) == [s.name for s in specs]
    assert g2.budget_sums == g1.budget_sums


def test_a_compiled_governed_run_follows_the_eager_one() -> None:
    """torch.compile (Inductor's C++ backend here, the same graph capture as on a GPU) with a
    governor: each set of frozen groups is its own graph. The forced moves below make twelve sets,
    more than Dynamo keeps by default (8, after which it would run the rest eagerly): all twelve
    compile, frozen groups still get no gradient (Spy), and the run follows the eager one (AdamW
    throughout: Muon's bfloat16 orthogonalisation would amplify the compiler's float rounding)."""
    require(os.environ.get("CXX", "g++"), package="g++")  # Inductor's CPU backend builds C++
    force = {2: ("d", CONVERGED), 3: ("c", CONVERGED), 4: ("d", AWAKENED), 5: ("b", CONVERGED),
             6: ("c", AWAKENED), 7: ("d", CONVERGED), 8: ("a", CONVERGED), 9: ("b", AWAKENED),
             10: ("d", AWAKENED), 11: ("c", CONVERGED), 12: ("b", CONVERGED)}
    runs = {}
    for compiled in (False, True):
        torch._dynamo.reset()
        counters.clear()
        model = gpt()
        gov = Spy(GovernorConfig(force_at=[0.0, 0.0, 0.0], awaken_steps=100, awaken_tol=10.0),
                  partition(model, SPECS), force=force)
        runs[compiled] = model, gov, train(model, gov, steps=14, compile=compiled, optim=OptimConfig(matrix="adamw"))
    assert len(runs[True][1].frozen_sets) == 12
    assert counters["stats"]["unique_graphs"] == 12, dict(counters["stats"])
    assert not counters["unimplemented"], list(counters["unimplemented"])  # no fallback to eager
    (eager, g_eager, r_eager), (comp, g_comp, r_comp) = runs[False], runs[True]
    assert transitions(g_comp) == transitions(g_eager)
    assert r_comp.train_loss == pytest.approx(r_eager.train_loss, rel=1e-5)
    for (name, a), b in zip(eager.named_parameters(), comp.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=5e-4, msg=name)
