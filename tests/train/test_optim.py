"""lmforge.train.optim and lmforge.train.config: parameter roles, optimizers, the schedule, validation;
and lmforge.train.loop.fit's optimisation: the loss goes down, gradient accumulation changes nothing."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch._inductor.config

from lmforge.errors import ConfigError
from lmforge.model import GPT, ModelConfig
from lmforge.tokens import TokenSplit
from lmforge.train import optim
from lmforge.train.config import OptimConfig, ScheduleConfig, TrainConfig
from lmforge.train.data import PackedRows
from lmforge.train.dist import Dist
from lmforge.train.loop import LM, Objective, fit

BLOCK_MATRICES = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight")
BLOCK_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny(*, tie: bool = False, qk_norm: bool = True, depth: int = 2) -> GPT:
    torch.manual_seed(0)
    return GPT(ModelConfig.from_depth(depth, vocab_size=48, aspect_ratio=32, head_dim=16,
                                      tie_embeddings=tie, qk_norm=qk_norm))


def names(groups: dict[str, list[tuple[str, torch.nn.Parameter]]], role: str) -> set[str]:
    return {n for n, _ in groups[role]}


@pytest.mark.parametrize("tie", [False, True])
def test_param_groups_assign_each_parameter_its_role_once(tie: bool) -> None:
    model = tiny(tie=tie)
    groups = optim.param_groups(model)
    assert set(groups) == {"matrix", "embedding", "head", "scalar"}
    layers = range(model.config.n_layer)
    assert names(groups, "embedding") == {"model.embed_tokens.weight"}
    assert names(groups, "head") == (set() if tie else {"lm_head.weight"})
    assert names(groups, "matrix") == {f"model.layers.{i}.{m}" for i in layers for m in BLOCK_MATRICES}
    assert names(groups, "scalar") == (
        {f"model.layers.{i}.{m}" for i in layers for m in BLOCK_NORMS}
        | {f"model.layers.{i}.self_attn.{q}_norm.weight" for i in layers for q in "qk"}
        | {"model.norm.weight"})
    assert all(p.ndim == 2 for _, p in groups["matrix"]) and all(p.ndim == 1 for _, p in groups["scalar"])
    ids = [id(p) for g in groups.values() for _, p in g]
    assert len(ids) == len(set(ids))
    assert set(ids) == {id(p) for p in model.parameters()}
    assert sum(p.numel() for g in groups.values() for _, p in g) == model.config.n_params()
    if tie:  # the head is the embedding: trained once, as the embedding
        assert groups["embedding"][0][1] is model.lm_head.weight


def test_param_groups_skip_frozen_parameters() -> None:
    model = tiny()
    model.model.embed_tokens.weight.requires_grad_(False)
    model.model.layers[0].self_attn.q_proj.weight.requires_grad_(False)
    groups = optim.param_groups(model)
    assert groups["embedding"] == []
    assert "model.layers.0.self_attn.q_proj.weight" not in names(groups, "matrix")
    opts = optim.build(model, OptimConfig(), model.config.d_model)
    in_opts = {id(p) for o in opts for g in o.param_groups for p in g["params"]}
    assert in_opts == {id(p) for p in model.parameters() if p.requires_grad}


def _params_by_optimizer(opts: list[torch.optim.Optimizer]) -> list[int]:
    return [id(p) for o in opts for g in o.param_groups for p in g["params"]]


@pytest.mark.parametrize("tie", [False, True])
def test_build_muon_for_block_matrices_adamw_for_the_rest(tie: bool) -> None:
    model = tiny(tie=tie)
    cfg = OptimConfig(embedding_lr=0.3, head_lr=0.01, scalar_lr=0.05, matrix_lr=0.07, weight_decay=0.1,
                      lr_scale_dim=256)
    d = model.config.d_model
    opts = optim.build(model, cfg, d)
    assert [type(o) for o in opts] == [torch.optim.AdamW, optim.Muon]  # torch.optim.Muon, sharding-aware
    adamw, muon = opts
    ids = _params_by_optimizer(opts)
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    groups = optim.param_groups(model)
    assert {id(p) for g in muon.param_groups for p in g["params"]} == {id(p) for _, p in groups["matrix"]}
    assert muon.param_groups[0]["lr"] == muon.param_groups[0]["peak_lr"] == 0.07
    assert muon.param_groups[0]["weight_decay"] == 0.1
    scale = (d / 256) ** -0.5
    want = {"embedding": 0.3 * scale, "scalar": 0.05 * scale} | ({} if tie else {"head": 0.01 * scale})
    got = {g["role"]: g["lr"] for g in adamw.param_groups}
    assert got == pytest.approx(want)
    for g in adamw.param_groups:
        assert g["peak_lr"] == g["lr"] and g["lr_mult"] == 1.0 and g["weight_decay"] == 0.0
        assert {id(p) for p in g["params"]} == {id(p) for _, p in groups[g["role"]]}


def test_build_matrix_adamw_is_one_optimizer_over_everything() -> None:
    model = tiny()
    opts = optim.build(model, OptimConfig(matrix="adamw", matrix_lr=0.003, weight_decay=0.2), model.config.d_model)
    assert [type(o) for o in opts] == [torch.optim.AdamW]
    ids = _params_by_optimizer(opts)
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    (matrix,) = [g for g in opts[0].param_groups if g["role"] == "matrix"]
    assert matrix["lr"] == 0.003 and matrix["weight_decay"] == 0.2
    assert len(matrix["params"]) == model.config.n_layer * len(BLOCK_MATRICES)


def test_built_optimizers_train_every_parameter() -> None:
    model = tiny()
    opts = optim.build(model, OptimConfig(), model.config.d_model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    idx = torch.randint(0, 48, (2, 9), generator=torch.Generator().manual_seed(0))
    for _ in range(2):  # o_proj/down_proj start at zero: their gradient flows from step 2 on
        model(idx[:, :-1], idx[:, 1:]).backward()
        for o in opts:
            o.step()
            o.zero_grad(set_to_none=True)
    unchanged = [n for n, p in model.named_parameters() if torch.equal(p, before[n])]
    assert unchanged == []


# --- schedule ------------------------------------------------------------------------------

def test_wsd_warmup_stable_decay() -> None:
    cfg = ScheduleConfig(warmup_frac=0.1, decay_frac=0.2, final_lr_frac=0.1)
    mults = [optim.wsd(s, 100, cfg) for s in range(100)]
    assert mults[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert mults[9] == 1.0
    assert all(m == 1.0 for m in mults[10:80])
    assert mults[80] < 1.0
    assert mults[-1] == pytest.approx(0.1)
    assert mults[80:] == pytest.approx([1 - (s - 79) / 20 * 0.9 for s in range(80, 100)])
    assert all(a <= b for a, b in zip(mults[:80], mults[1:80], strict=False))
    assert all(a >= b for a, b in zip(mults[79:], mults[80:], strict=False))
    assert min(mults) == pytest.approx(0.1) and max(mults) == 1.0


@pytest.mark.parametrize(("warmup", "decay", "final"), [(0.0, 0.2, 0.0), (0.0, 0.0, 0.0), (0.3, 0.7, 0.25),
                                                        (0.05, 1.0 - 0.05, 0.0)])
def test_wsd_edges(warmup: float, decay: float, final: float) -> None:
    cfg = ScheduleConfig(warmup_frac=warmup, decay_frac=decay, final_lr_frac=final)
    total = 40
    mults = [optim.wsd(s, total, cfg) for s in range(total)]
    if warmup == 0:
        assert mults[0] == 1.0
    else:
        assert mults[0] == pytest.approx(1 / round(warmup * total))
    assert mults[-1] == pytest.approx(final if decay else 1.0)
    peak = mults.index(max(mults))
    assert max(mults) == 1.0
    assert all(a <= b for a, b in zip(mults[:peak], mults[1:peak + 1], strict=True))
    assert all(a >= b for a, b in zip(mults[peak:], mults[peak + 1:], strict=False))


def test_set_lr_applies_peak_times_group_mult_times_schedule() -> None:
    model = tiny()
    opts = optim.build(model, OptimConfig(), model.config.d_model)
    adamw, muon = opts
    adamw.param_groups[0]["lr_mult"] = 0.5
    optim.set_lr(opts, 0.3)
    for o in opts:
        for g in o.param_groups:
            assert g["lr"] == pytest.approx(g["peak_lr"] * g["lr_mult"] * 0.3)
    assert adamw.param_groups[0]["lr"] == pytest.approx(adamw.param_groups[0]["peak_lr"] * 0.15)
    assert muon.param_groups[0]["lr"] == pytest.approx(0.02 * 0.3)
    del adamw.param_groups[1]["lr_mult"]  # lr_mult is optional
    optim.set_lr(opts, 1.0)
    assert adamw.param_groups[1]["lr"] == adamw.param_groups[1]["peak_lr"]
    assert muon.param_groups[0]["lr"] == muon.param_groups[0]["peak_lr"]


# --- config validation ---------------------------------------------------------------------

def test_schedule_config_validation() -> None:
    with pytest.raises(ValueError, match="warmup_frac \\+ decay_frac"):
        ScheduleConfig(warmup_frac=0.6, decay_frac=0.5)
    with pytest.raises(ValueError, match="final_lr_frac must be within"):
        ScheduleConfig(final_lr_frac=1.5)
    assert ScheduleConfig(warmup_frac=0.5, decay_frac=0.5).decay_frac == 0.5


def test_train_config_needs_exactly_one_budget() -> None:
    with pytest.raises(ValueError, match="exactly one of steps, tokens, tokens_per_param"):
        TrainConfig()
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(steps=10, tokens=1000)
    with pytest.raises(ValueError, match="exactly one"):
        TrainConfig(tokens=1000, tokens_per_param=20.0)
    assert TrainConfig(steps=7).total_steps(10**6) == 7
    cfg = TrainConfig(tokens=10_000, seq_len=10, micro_batch=2, global_batch=4)
    assert cfg.total_steps(1) == 250
    assert TrainConfig(tokens_per_param=2.0, seq_len=10, micro_batch=2, global_batch=4).total_steps(500) == 25
    assert TrainConfig(tokens=1, seq_len=10, micro_batch=2, global_batch=4).total_steps(1) == 1


def test_train_config_batch_checks() -> None:
    with pytest.raises(ValueError, match="global_batch 10 must be a multiple of micro_batch 4"):
        TrainConfig(steps=1, micro_batch=4, global_batch=10)
    with pytest.raises(ValueError, match="micro_batch must be >= 1"):
        TrainConfig(steps=1, micro_batch=0)
    cfg = TrainConfig(steps=1, micro_batch=2, global_batch=8)
    assert [cfg.accum_steps(w) for w in (1, 2, 4)] == [4, 2, 1]
    with pytest.raises(ValueError, match="global_batch 8") as e:
        cfg.accum_steps(3)
    assert "micro_batch" in str(e.value) and "3" in str(e.value)
    with pytest.raises(ValueError, match="global_batch 8"):
        cfg.accum_steps(8)


# --- fit: the loss goes down, and accumulation is the same step ------------------------------

V = 32


def counting_split(n_docs: int = 120) -> TokenSplit:
    """Documents that count up (mod V - 1) from a random start: easy to learn."""
    rng = np.random.default_rng(0)
    tokens, offsets = [], [0]
    for _ in range(n_docs):
        n, a = int(rng.integers(4, 40)), int(rng.integers(0, V - 1))
        tokens += [0] + [1 + (a + k) % (V - 1) for k in range(n - 1)]
        offsets.append(offsets[-1] + n)
    return TokenSplit(tokens=np.array(tokens, dtype=np.int64), offsets=np.array(offsets, dtype=np.int64),
                      index={}, bos_id=0)


class Masked:
    """PackedRows whose targets above 20 are ignored (-1): micro-batches count unequal targets."""

    def __init__(self, loader: PackedRows):
        self.loader = loader

    def next_step(self, global_batch: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
        out = []
        for b in self.loader.next_step(global_batch, micro_batch):
            targets = b["targets"].clone()
            targets[targets > 20] = -1
            out.append({"inputs": b["inputs"], "targets": targets})
        return out

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


def train_curve(micro_batch: int, steps: int, *, matrix: str = "muon", masked: bool = False,
                compile: bool = False) -> tuple[list[float], GPT]:
    """Per-step mean training loss of a fit, recorded from the objective itself."""
    torch.manual_seed(0)
    model = GPT(ModelConfig.from_depth(1, vocab_size=V, aspect_ratio=32, head_dim=16, max_seq_len=64))
    cfg = TrainConfig(steps=steps, seq_len=16, micro_batch=micro_batch, global_batch=8, progress=False,
                      device="cpu", eval_every=1000, ckpt_every=1000, optim=OptimConfig(matrix=matrix, lr_scale_dim=32),
                      compile=compile)
    sums: list[float] = []
    counts: list[int] = []

    def loss(m: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        value = LM.loss(m, batch)
        sums.append(float(value.detach()))
        counts.append(LM.count(batch))
        return value

    data = PackedRows(counting_split(), 16, seed=1)
    result = fit(model, Objective("recorded", loss, LM.count), Masked(data) if masked else data, cfg,
                 dist=Dist(0, 1, 0, torch.device("cpu")), total_steps=steps, d_model=model.config.d_model)
    per = 8 // micro_batch
    assert len(sums) == steps * per
    curve = [sum(sums[i:i + per]) / sum(counts[i:i + per]) for i in range(0, len(sums), per)]
    assert result.steps == steps and result.tokens == steps * 8 * 16
    assert result.train_loss == pytest.approx(curve[-1], rel=1e-12)
    return curve, model


def test_fit_lowers_the_loss() -> None:
    curve, _ = train_curve(8, 30)
    assert curve[0] == pytest.approx(math.log(V), abs=0.1)  # the untrained head is near uniform
    assert np.mean(curve[-5:]) < 0.5 * np.mean(curve[:5]), np.round(curve, 3)
    assert curve[-1] < 1.0


@pytest.mark.parametrize("matrix", ["adamw", "muon"])
def test_grad_accumulation_gives_the_same_loss_curve(matrix: str) -> None:
    # targets are partly ignored, unequally per micro-batch: the step must still weight every
    # counted target of the global batch equally. (Muon orthogonalises in bfloat16, so its
    # curves drift apart slowly: 20 steps stay well within 1e-4.)
    one, m1 = train_curve(8, 20, matrix=matrix, masked=True)
    four, m4 = train_curve(2, 20, matrix=matrix, masked=True)
    np.testing.assert_allclose(four, one, rtol=1e-4)
    assert one[-1] < 0.7 * one[0]
    if matrix == "adamw":  # in float32 throughout: the weights agree too
        for (name, a), b in zip(m1.named_parameters(), m4.parameters(), strict=True):
            torch.testing.assert_close(b, a, rtol=1e-4, atol=2e-4, msg=name)


def test_compile_on_the_cpu_needs_a_cpp_compiler(monkeypatch: pytest.MonkeyPatch) -> None:
    """Inductor builds C++ kernels on the CPU: without a working compiler, fit refuses before
    training, naming the setting and the fix. (A compiled run itself: test_governor.py.)"""
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", ("lmforge-no-such-c++",))
    with pytest.raises(ConfigError, match=r"train\.compile: true on the CPU needs a C\+\+ compiler.*apt install g\+\+"):
        train_curve(8, 2, compile=True)
