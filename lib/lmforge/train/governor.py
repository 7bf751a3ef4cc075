"""Convergence governance: a plug-in of the one training loop that stops spending compute on
parameter groups that have converged. `fit(..., plugin=Governor(cfg, groups))`.

Every group (lmforge.train.groups) is in one state:

    PENDING    its level has not started yet (frozen)
    ACTIVE     training
    COOLING    for `window` steps, its gradient-norm EMA stayed below `cool_ratio` x its early
               level, or its yield below `cool_yield`
    CONVERGED  ... and for `window` more steps below `converge_ratio` x / `converge_yield`: frozen
    AWAKENED   a validation regression unfroze it; ACTIVE again after `awaken_steps` steps

ACTIVE -> COOLING -> CONVERGED -> AWAKENED -> ACTIVE; COOLING goes back to ACTIVE when neither
cooling condition holds any more. The "early level" of a group is its EMA after its first
`ref_steps` trained steps; both signals are judged from then on.

The loss signal is threefold. Each group's loss contribution (the first-order loss decrease of
its last update, g . (theta_before - theta_after), as an EMA) gives its *yield*: contribution
per FLOP of its gradient (grad_work) over the same for all trainable groups together. A group
at yield 1 buys loss at the model's average rate; one at 0.1 spends its gradient FLOPs ten
times less well, which is what an already-converged group does even while its gradient stays
large (noise keeps the norm up: on a pretrained model, gradient norms barely fall while the
contributions per FLOP differ 50-fold between matrices; bench/results/govern_frontier.md). The
contribution also weighs each group's budget share (`loss_weight`), and a validation loss that
regresses by more than `awaken_tol` over the best seen awakens the groups that converged most
recently.

Frozen is real: a frozen group's tensors have requires_grad False, so autograd computes no
gradient for them, the optimizers skip them (their grad is None) and their bytes do not change;
their optimizer state stays in the optimizer, so an awakened group resumes with its moments.
Nothing recreates an optimizer.

Coarse to fine: only level-0 groups train at first; level k starts when every group below it
is cooling or converged, or at the latest after `force_at[k-1]` of the steps.

Budget: each step the trainable groups share a master `budget` by need (gradient ratio plus
`loss_weight` x normalised loss contribution), each share clamped to [share_floor,
share_ceiling]; `sum(shares) <= budget` always (checked every step, recorded). A group's
learning-rate multiplier is its share over the equal share, budget / trainable groups.

Evaluation is change-triggered: after a state change the loop evaluates, at most `eval_cap`
times per `eval_window` steps (and once at the end). Every state change is an event (group,
old -> new, step, signals) for MLflow and the audit log.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from pydantic import model_validator
from torch import nn

from ..config import Config
from ..errors import ConfigError
from .groups import LEVELS, Group

PENDING, ACTIVE, COOLING, CONVERGED, AWAKENED = "PENDING", "ACTIVE", "COOLING", "CONVERGED", "AWAKENED"
STATE_CODE = {PENDING: 0, ACTIVE: 1, COOLING: 2, CONVERGED: 3, AWAKENED: 4}  # MLflow curves
FROZEN = (PENDING, CONVERGED)


class GovernorConfig(Config):
    ema_decay: float = 0.9          # EMA of each group's gradient norm: ema = d ema + (1 - d) norm
    ref_steps: int = 10             # the early level: the EMA after a group's first ref_steps steps
    cool_ratio: float = 0.8         # ema / early level below this for `window` steps: ACTIVE -> COOLING
    converge_ratio: float = 0.6     # ... below this for `window` more steps: COOLING -> CONVERGED
    cool_yield: float = 0.0         # yield below this for `window` steps: ACTIVE -> COOLING (0: off)
    converge_yield: float = 0.0     # ... below this for `window` more steps: COOLING -> CONVERGED
    window: int = 5
    awaken_tol: float = 0.01        # val loss > best x (1 + awaken_tol): latest converged groups awaken
    awaken_steps: int = 10          # AWAKENED -> ACTIVE after this many steps
    force_at: list[float] = [0.2, 0.4, 0.6]  # fraction of the steps by which L1, L2, L3 start
    budget: float = 1.0
    share_floor: float = 0.02
    share_ceiling: float = 0.6
    loss_weight: float = 0.0        # need = gradient ratio + loss_weight x loss contribution / mean
    eval_cap: int = 2               # change-triggered evaluations per eval_window steps, at most
    eval_window: int = 50

    @model_validator(mode="after")
    def _ranges(self) -> GovernorConfig:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(msg)
        need(0.0 <= self.ema_decay < 1.0, f"ema_decay must be in [0, 1) (got {self.ema_decay})")
        need(0.0 < self.cool_ratio <= 1.0, f"cool_ratio must be in (0, 1] (got {self.cool_ratio})")
        need(0.0 < self.converge_ratio <= self.cool_ratio,
             f"converge_ratio must be in (0, cool_ratio = {self.cool_ratio}] (got {self.converge_ratio})")
        need(0.0 <= self.cool_yield < 1.0, f"cool_yield must be in [0, 1) (got {self.cool_yield})")
        need(0.0 <= self.converge_yield <= self.cool_yield,
             f"converge_yield must be in [0, cool_yield = {self.cool_yield}] (got {self.converge_yield})")
        need(self.awaken_tol >= 0.0, f"awaken_tol must be >= 0 (got {self.awaken_tol})")
        need(len(self.force_at) == LEVELS - 1, f"force_at lists {LEVELS - 1} fractions, for L1..L{LEVELS - 1} "
             f"(got {len(self.force_at)})")
        need(all(0.0 <= f <= 1.0 for f in self.force_at), f"force_at fractions must be in [0, 1] (got {self.force_at})")
        need(list(self.force_at) == sorted(self.force_at), f"force_at must not decrease (got {self.force_at})")
        need(self.budget > 0.0, f"budget must be > 0 (got {self.budget})")
        need(0.0 <= self.share_floor <= self.share_ceiling <= self.budget,
             f"need 0 <= share_floor ({self.share_floor}) <= share_ceiling ({self.share_ceiling}) <= budget ({self.budget})")
        need(self.loss_weight >= 0.0, f"loss_weight must be >= 0 (got {self.loss_weight})")
        for key in ("ref_steps", "window", "awaken_steps", "eval_cap", "eval_window"):
            need(getattr(self, key) >= 1, f"{key} must be >= 1 (got {getattr(self, key)})")
        return self


@dataclass
class GroupState:
    state: str
    ema: float | None = None        # gradient-norm EMA
    ref: float | None = None        # the early level
    trained: int = 0                # steps trained since first activated
    streak: int = 0                 # consecutive steps the current transition's condition held
    since: int = 0                  # step of the last transition
    contrib: float | None = None    # loss-contribution EMA
    share: float = 0.0
    yld: float | None = None        # yield: contribution per gradient FLOP over all trainable groups'

    @property
    def ratio(self) -> float | None:
        return None if self.ema is None or not self.ref else self.ema / self.ref


def allocate(needs: dict[str, float], budget: float, floor: float, ceiling: float) -> dict[str, float]:
    """Shares of `budget` proportional to `needs` within [floor, ceiling]: share = clamp(scale x
    need, floor, ceiling) with the largest scale whose shares sum to at most `budget` (found by
    bisection; the sum is then `budget` up to float error, or less when every share is at its
    ceiling). With no need anywhere, equal shares."""
    if not needs:
        return {}
    if all(v <= 0 for v in needs.values()):
        needs = dict.fromkeys(needs, 1.0)

    def shares(scale: float) -> dict[str, float]:
        return {g: min(max(scale * v, floor), ceiling) for g, v in needs.items()}

    lo, hi = 0.0, ceiling / min(v for v in needs.values() if v > 0)  # at hi every needy share is at the ceiling
    if sum(shares(hi).values()) <= budget:
        return shares(hi)
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if sum(shares(mid).values()) <= budget else (lo, mid)
    return shares(lo)


def grad_work(name: str, p: nn.Parameter) -> int:
    """FLOPs per token to compute this tensor's gradient: 2 x numel for a matrix that multiplies
    activations, d for an embedding (one row added per token), 2 x numel for a norm weight."""
    return p.shape[1] if "embed_tokens" in name else 2 * p.numel()


@dataclass
class Governor:
    cfg: GovernorConfig
    groups: list[Group]
    states: dict[str, GroupState] = field(default_factory=dict)
    events: list[dict[str, Any]] = field(default_factory=list)
    budget_sums: list[float] = field(default_factory=list)  # sum(shares) at every step
    evals: list[int] = field(default_factory=list)          # steps of change-triggered evaluations
    eval_due: bool = False
    best_val: float | None = None
    work_done: float = 0.0
    work_all: float = 0.0

    def __post_init__(self) -> None:
        if not self.states:
            self.states = {g.name: GroupState(ACTIVE if g.level == 0 else PENDING) for g in self.groups}
        self._params: dict[str, list[nn.Parameter]] = {}
        self._opt_groups: dict[str, list[dict[str, Any]]] = {}
        self._work: dict[str, int] = {}
        self._prev: dict[str, list[torch.Tensor]] = {}
        self._norms: dict[str, float] = {}
        self.total_steps = 0

    # --- wiring -----------------------------------------------------------------------------

    def split(self) -> dict[str, str]:
        """Parameter name -> group name, for optim.build(split=...)."""
        return {n: g.name for g in self.groups for n in g.params}

    def attach(self, model: nn.Module, opts: list[torch.optim.Optimizer], total_steps: int) -> None:
        if self.cfg.share_floor * len(self.groups) > self.cfg.budget:
            raise ConfigError(f"govern.governor: share_floor {self.cfg.share_floor} x {len(self.groups)} groups exceeds "
                              f"budget {self.cfg.budget}; lower share_floor")
        named = dict(model.named_parameters())
        self._params = {g.name: [named[n] for n in g.params] for g in self.groups}
        self._work = {g.name: sum(grad_work(n, named[n]) for n in g.params) for g in self.groups}
        self._opt_groups = {g.name: [] for g in self.groups}
        for opt in opts:
            for pg in opt.param_groups:
                if pg.get("gov") not in self._opt_groups:
                    raise ValueError("governor: optimizers must be built with optim.build(split=governor.split())")
                self._opt_groups[pg["gov"]].append(pg)
        self.total_steps = total_steps
        self._allocate()
        self.apply()

    def apply(self) -> bool:
        """requires_grad and lr_mult from the states; True if the trainable set changed."""
        changed = False
        for g in self.groups:
            st = self.states[g.name]
            train = st.state not in FROZEN
            for p in self._params[g.name]:
                changed |= p.requires_grad != train
                p.requires_grad_(train)
            for pg in self._opt_groups[g.name]:
                pg["lr_mult"] = self._multiplier(st)
        return changed

    def _trainable(self) -> list[str]:
        return [g.name for g in self.groups if self.states[g.name].state not in FROZEN]

    def _multiplier(self, st: GroupState) -> float:
        n = len(self._trainable())
        return 0.0 if st.state in FROZEN or n == 0 else st.share * n / self.cfg.budget

    # --- the loop's hooks -------------------------------------------------------------------

    def before_step(self, step: int) -> bool:
        """Start the levels whose forced fraction has come; freeze / unfreeze. True: the
        trainable set changed (a DDP wrapper must be rebuilt)."""
        for k in range(1, LEVELS):
            if step >= round(self.cfg.force_at[k - 1] * self.total_steps):
                self._start_level(k, step, reason="forced")
        self._allocate()
        return self.apply()

    @torch.no_grad()
    def before_update(self, step: int) -> None:
        """After backward and clipping, before the optimizer: each trainable group's gradient
        norm, and a copy of its weights to measure the update's loss contribution."""
        self._norms, self._prev = {}, {}
        for name in self._trainable():
            grads = [p.grad for p in self._params[name] if p.grad is not None]
            if grads:
                self._norms[name] = float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float())
                                                                                 for g in grads])))
                self._prev[name] = [p.detach().clone() for p in self._params[name]]

    @torch.no_grad()
    def after_update(self, step: int) -> bool:
        """After the optimizer step (gradients still held): update signals, states, shares.
        True: evaluate now (a state changed and the cap allows it)."""
        done = step + 1
        trainable = self._trainable()
        self.work_all += sum(self._work.values())
        self.work_done += sum(self._work[g] for g in trainable)
        d = self.cfg.ema_decay
        measured = [name for name in trainable if name in self._norms]
        for name in measured:
            st = self.states[name]
            contrib = sum(float((p.grad.float() * (q.float() - p.float())).sum())
                          for p, q in zip(self._params[name], self._prev[name], strict=True) if p.grad is not None)
            st.contrib = contrib if st.contrib is None else d * st.contrib + (1 - d) * contrib
            norm = self._norms[name]
            st.ema = norm if st.ema is None else d * st.ema + (1 - d) * norm
            st.trained += 1
            if st.trained == self.cfg.ref_steps:
                st.ref = st.ema
        self._yields(measured)
        for name in measured:
            self._advance(name, self.states[name], done)
        self._prev = {}
        for k in range(1, LEVELS):
            below = [g for g in self.groups if g.level < k]
            if below and all(self.states[g.name].state in (COOLING, CONVERGED) for g in below):
                self._start_level(k, done, reason="cooled")
        self._allocate()
        self.apply()
        self.budget_sums.append(sum(st.share for st in self.states.values()))
        recent = [s for s in self.evals if s > done - self.cfg.eval_window]
        if self.eval_due and len(recent) < self.cfg.eval_cap:
            self.eval_due = False
            self.evals.append(done)
            return True
        return False

    def on_eval(self, step: int, metrics: dict[str, float]) -> None:
        """A validation result: a new best is remembered; a regression beyond awaken_tol
        awakens the groups that converged last."""
        val = metrics.get("val_loss")
        if val is None or not math.isfinite(val):
            return
        if self.best_val is None or val < self.best_val:
            self.best_val = val
            return
        if val <= self.best_val * (1 + self.cfg.awaken_tol):
            return
        converged = [(self.states[g.name].since, g.name) for g in self.groups if self.states[g.name].state == CONVERGED]
        if converged:
            last = max(s for s, _ in converged)
            for s, name in converged:
                if s == last:
                    self._move(name, AWAKENED, step, val_loss=val, best_val_loss=self.best_val)
            self._allocate()
            self.apply()

    # --- states -----------------------------------------------------------------------------

    def _yields(self, names: list[str]) -> None:
        """Each group's yield: its contribution per gradient FLOP over that of `names` together
        (the trainable groups). None where the total contribution is not positive: no rate to
        compare with."""
        total = sum(self.states[n].contrib or 0.0 for n in names)
        rate = total / sum(self._work[n] for n in names) if names else 0.0
        for n in names:
            st = self.states[n]
            st.yld = (st.contrib or 0.0) / self._work[n] / rate if rate > 0 else None

    def _below(self, st: GroupState, ratio: float, yld: float) -> bool:
        """Either signal under its threshold. A yield threshold of 0 is off, even for a group
        whose updates raise the loss (a negative yield): the gradient rule alone decides."""
        return (st.ratio is not None and st.ratio < ratio) or (yld > 0 and st.yld is not None and st.yld < yld)

    def _advance(self, name: str, st: GroupState, step: int) -> None:
        cfg = self.cfg
        if st.state == AWAKENED:
            if step - st.since >= cfg.awaken_steps:
                self._move(name, ACTIVE, step)
            return
        if st.ref is None:  # not yet trained ref_steps steps: no early level, signals still settling
            return
        if st.state == ACTIVE:
            st.streak = st.streak + 1 if self._below(st, cfg.cool_ratio, cfg.cool_yield) else 0
            if st.streak >= cfg.window:
                self._move(name, COOLING, step)
        elif st.state == COOLING:
            if not self._below(st, cfg.cool_ratio, cfg.cool_yield):
                self._move(name, ACTIVE, step)
                return
            st.streak = st.streak + 1 if self._below(st, cfg.converge_ratio, cfg.converge_yield) else 0
            if st.streak >= cfg.window:
                self._move(name, CONVERGED, step)

    def _start_level(self, k: int, step: int, *, reason: str) -> None:
        for g in self.groups:
            if g.level <= k and self.states[g.name].state == PENDING:
                self._move(g.name, ACTIVE, step, reason=reason, level=g.level)

    def _move(self, name: str, new: str, step: int, **signals: Any) -> None:
        st = self.states[name]
        sig = {"ema": st.ema, "ref": st.ref, "ratio": st.ratio, "contribution": st.contrib, "yield": st.yld,
               "share": st.share}
        sig.update(signals)
        self.events.append({"step": step, "group": name, "old": st.state, "new": new,
                            "signals": {k: (round(v, 8) if isinstance(v, float) else v) for k, v in sig.items()}})
        st.state, st.streak, st.since = new, 0, step
        self.eval_due = True

    def _allocate(self) -> None:
        trainable = self._trainable()
        contribs = [max(self.states[g].contrib or 0.0, 0.0) for g in trainable]
        mean_c = sum(contribs) / len(contribs) if contribs else 0.0
        needs = {}
        for g, c in zip(trainable, contribs, strict=True):
            r = self.states[g].ratio
            needs[g] = (1.0 if r is None else r) + self.cfg.loss_weight * (c / mean_c if mean_c > 0 else 1.0)
        shares = allocate(needs, self.cfg.budget, self.cfg.share_floor, self.cfg.share_ceiling)
        for g in self.groups:
            self.states[g.name].share = shares.get(g.name, 0.0)
        total = sum(shares.values())
        if total > self.cfg.budget * (1 + 1e-9):
            raise AssertionError(f"governor: shares sum to {total} > budget {self.cfg.budget}")

    # --- reporting and resume ---------------------------------------------------------------

    @property
    def skipped_fraction(self) -> float:
        return 0.0 if not self.work_all else 1.0 - self.work_done / self.work_all

    def metrics(self) -> dict[str, float]:
        """Curves for the loop to log at the current step."""
        out: dict[str, float] = {"govern/skipped_fraction": self.skipped_fraction,
                                 "govern/budget_sum": sum(st.share for st in self.states.values()),
                                 "govern/trainable_groups": float(len(self._trainable()))}
        for name, st in self.states.items():
            out[f"govern/{name}/state"] = float(STATE_CODE[st.state])
            out[f"govern/{name}/share"] = st.share
            if st.ratio is not None:
                out[f"govern/{name}/ratio"] = st.ratio
            if st.yld is not None:
                out[f"govern/{name}/yield"] = st.yld
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"states": {k: asdict(v) for k, v in self.states.items()}, "events": self.events,
                "budget_sums": self.budget_sums, "evals": self.evals, "eval_due": self.eval_due,
                "best_val": self.best_val, "work_done": self.work_done, "work_all": self.work_all}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if set(state["states"]) != set(self.states):
            raise ValueError(f"governor state has groups {sorted(state['states'])}, not {sorted(self.states)}")
        # In the groups' order, as __post_init__ made it, not the checkpoint's (its JSON sorts keys):
        # sums over the states (budget_sums, the reported max_sum) then add up in the same order as
        # in an uninterrupted run, to the same last bit.
        self.states = {g.name: GroupState(**state["states"][g.name]) for g in self.groups}
        self.events, self.budget_sums, self.evals = list(state["events"]), list(state["budget_sums"]), list(state["evals"])
        self.eval_due, self.best_val = bool(state["eval_due"]), state["best_val"]
        self.work_done, self.work_all = float(state["work_done"]), float(state["work_all"])
