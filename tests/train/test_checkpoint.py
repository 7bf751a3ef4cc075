"""lmforge.train.checkpoint: exact round trips of model, optimizers and RNGs; refusal of damage."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import InputError
from lmforge.model import GPT, ModelConfig
from lmforge.tokens import TokenSplit
from lmforge.train import checkpoint, optim
from lmforge.train.config import OptimConfig, ScheduleConfig, TrainConfig
from lmforge.train.data import PackedRows
from lmforge.train.dist import Dist
from lmforge.train.loop import LM, fit

VOCAB = 40


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_model(seed: int, *, tie: bool = False) -> GPT:
    torch.manual_seed(seed)
    return GPT(ModelConfig.from_depth(1, vocab_size=VOCAB, aspect_ratio=32, head_dim=16, tie_embeddings=tie))


def batches(seed: int, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (4, 13), generator=g) for _ in range(n)]


def train(model: GPT, opts: list[torch.optim.Optimizer], data: list[torch.Tensor]) -> None:
    for i, rows in enumerate(data):
        optim.set_lr(opts, 1.0 - 0.1 * i)
        model(rows[:, :-1], rows[:, 1:]).backward()
        for o in opts:
            o.step()
        for o in opts:
            o.zero_grad(set_to_none=True)


def trained(tie: bool = False) -> tuple[GPT, list[torch.optim.Optimizer]]:
    model = make_model(0, tie=tie)
    opts = optim.build(model, OptimConfig(), model.config.d_model)
    train(model, opts, batches(1, 3))
    return model, opts


def fresh(tie: bool = False) -> tuple[GPT, list[torch.optim.Optimizer]]:
    model = make_model(123, tie=tie)
    return model, optim.build(model, OptimConfig(), model.config.d_model)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def assert_same_optimizer(a: torch.optim.Optimizer, b: torch.optim.Optimizer) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    assert len(sa["state"]) == sum(len(g["params"]) for g in sa["param_groups"])
    for pid in sa["state"]:
        assert sa["state"][pid].keys() == sb["state"][pid].keys()
        for key, va in sa["state"][pid].items():
            vb = sb["state"][pid][key]
            if isinstance(va, torch.Tensor):
                assert va.dtype == vb.dtype and torch.equal(va, vb), (pid, key)
            else:
                assert va == vb, (pid, key)
    assert sa["param_groups"] == sb["param_groups"]


def assert_same_state(model: GPT, opts: list, model2: GPT, opts2: list) -> None:
    assert_same_weights(weights(model), weights(model2))
    for a, b in zip(opts, opts2, strict=True):
        assert_same_optimizer(a, b)


def test_round_trip_restores_weights_optimizers_and_continues_bit_for_bit(tmp_path: Path) -> None:
    model, opts = trained()
    assert [type(o) for o in opts] == [torch.optim.AdamW, optim.Muon] and issubclass(optim.Muon, torch.optim.Muon)
    ckpt = checkpoint.save(tmp_path, 3, model, opts, {"data": {"epoch": 0, "row": 12}, "tokens": 99})
    assert ckpt == tmp_path / "step-00000003"
    assert sorted(p.name for p in ckpt.iterdir()) == ["manifest.json", "model.safetensors", "optim.safetensors",
                                                       "state.json"]

    model2, opts2 = fresh()
    assert not torch.equal(model2.model.embed_tokens.weight, model.model.embed_tokens.weight)
    state = checkpoint.load(ckpt, model2, opts2)
    assert state["step"] == 3 and state["data"] == {"epoch": 0, "row": 12} and state["tokens"] == 99
    assert_same_state(model, opts, model2, opts2)

    more = batches(2, 3)
    train(model, opts, more)
    train(model2, opts2, more)
    assert_same_state(model, opts, model2, opts2)


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    model, opts = trained(tie=True)
    ckpt = checkpoint.save(tmp_path, 3, model, opts, {})
    stored = load_file(str(ckpt / "model.safetensors"))
    assert "model.embed_tokens.weight" in stored and "lm_head.weight" not in stored  # stored once
    model2, opts2 = fresh(tie=True)
    checkpoint.load(ckpt, model2, opts2)
    assert model2.lm_head.weight is model2.model.embed_tokens.weight  # still tied
    assert_same_state(model, opts, model2, opts2)
    more = batches(5, 2)
    train(model, opts, more)
    train(model2, opts2, more)
    assert_same_weights(weights(model), weights(model2))


def test_rng_states_are_restored(tmp_path: Path) -> None:
    model, opts = trained()
    torch.manual_seed(42)
    np.random.seed(42)
    random.seed(42)
    np.random.standard_normal()  # a cached Gaussian is part of NumPy's legacy state
    ckpt = checkpoint.save(tmp_path, 1, model, opts, {})
    after_save = (torch.rand(5), np.random.rand(5), np.random.standard_normal(3), [random.random() for _ in range(5)])
    torch.manual_seed(7)
    np.random.seed(7)
    random.seed(7)
    checkpoint.load(ckpt, *fresh())
    after_load = (torch.rand(5), np.random.rand(5), np.random.standard_normal(3), [random.random() for _ in range(5)])
    assert torch.equal(after_save[0], after_load[0])
    np.testing.assert_array_equal(after_save[1], after_load[1])
    np.testing.assert_array_equal(after_save[2], after_load[2])
    assert after_save[3] == after_load[3]


def test_latest_is_the_newest_and_keep_deletes_older(tmp_path: Path) -> None:
    assert checkpoint.latest(tmp_path) is None
    assert checkpoint.latest(tmp_path / "nowhere") is None
    model, opts = trained()
    keep3 = tmp_path / "keep3"
    for step in (2, 4, 6):
        checkpoint.save(keep3, step, model, opts, {}, keep=3)
        assert checkpoint.latest(keep3) == keep3 / f"step-{step:08d}"
    assert sorted(p.name for p in keep3.glob("step-*")) == ["step-00000002", "step-00000004", "step-00000006"]
    checkpoint.save(keep3, 8, model, opts, {}, keep=2)
    assert sorted(p.name for p in keep3.glob("step-*")) == ["step-00000006", "step-00000008"]

    keep1 = tmp_path / "keep1"
    for step in (5, 10, 15):
        checkpoint.save(keep1, step, model, opts, {})
        assert [p.name for p in keep1.iterdir() if p.name.startswith("step-")] == [f"step-{step:08d}"]
    assert checkpoint.latest(keep1) == keep1 / "step-00000015"
    assert json.loads((keep1 / "latest.json").read_text())["step"] == 15
    assert sorted(p.name for p in keep1.iterdir()) == ["latest.json", "step-00000015"]  # no temporaries left
    state = checkpoint.load(checkpoint.latest(keep1), *fresh())
    assert state["step"] == 15


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "optim.safetensors", "state.json"])
def test_a_flipped_byte_is_refused_naming_the_file_and_nothing_is_loaded(tmp_path: Path, name: str) -> None:
    model, opts = trained()
    ckpt = checkpoint.save(tmp_path, 3, model, opts, {"data": {"row": 1}})
    _flip_byte(ckpt / name)
    target, target_opts = fresh()
    before = weights(target)
    opt_before = [o.state_dict() for o in target_opts]
    with pytest.raises(InputError, match=name) as e:
        checkpoint.load(ckpt, target, target_opts)
    assert Path(e.value.path) == ckpt / name
    assert "sha256" in e.value.problem
    assert_same_weights(before, weights(target))
    assert [len(o.state_dict()["state"]) for o in target_opts] == [len(s["state"]) for s in opt_before] == [0, 0]


def test_missing_manifest_or_file_is_refused(tmp_path: Path) -> None:
    model, opts = trained()
    ckpt = checkpoint.save(tmp_path, 3, model, opts, {})
    (ckpt / "optim.safetensors").unlink()
    target, target_opts = fresh()
    before = weights(target)
    with pytest.raises(InputError, match="optim.safetensors"):
        checkpoint.load(ckpt, target, target_opts)
    (ckpt / "manifest.json").unlink()
    with pytest.raises(InputError, match="manifest.json"):
        checkpoint.load(ckpt, target, target_opts)
    assert_same_weights(before, weights(target))


def test_latest_pointing_at_a_missing_or_unreadable_checkpoint_is_refused(tmp_path: Path) -> None:
    model, opts = trained()
    checkpoint.save(tmp_path, 3, model, opts, {})
    (tmp_path / "latest.json").write_text(json.dumps({"checkpoint": "step-00000099", "step": 99}))
    with pytest.raises(InputError, match="step-00000099") as e:
        checkpoint.latest(tmp_path)
    assert "missing" in e.value.problem
    (tmp_path / "latest.json").write_text("{not json")
    with pytest.raises(InputError, match="latest.json"):
        checkpoint.latest(tmp_path)


def test_a_checkpoint_of_another_optimizer_setup_is_refused(tmp_path: Path) -> None:
    model, opts = trained()
    ckpt = checkpoint.save(tmp_path, 3, model, opts, {})
    other = make_model(5)
    adamw_only = optim.build(other, OptimConfig(matrix="adamw"), other.config.d_model)
    with pytest.raises(InputError, match="2 optimizers saved, 1 in use"):
        checkpoint.load(ckpt, other, adamw_only)


# --- fit: a run that crashed and resumed ends where an uninterrupted one does ----------------

def small_split() -> TokenSplit:
    rng = np.random.default_rng(3)
    tokens, offsets = [], [0]
    for _ in range(40):
        n = int(rng.integers(3, 45))
        tokens += [0] + rng.integers(1, VOCAB, size=n - 1).tolist()
        offsets.append(offsets[-1] + n)
    return TokenSplit(tokens=np.array(tokens, dtype=np.int64), offsets=np.array(offsets, dtype=np.int64),
                      index={}, bos_id=0)


class Crash(Exception):
    pass


class CrashingRows:
    """PackedRows that dies when asked for step `crash_at` (1-based): a killed run."""

    def __init__(self, loader: PackedRows, crash_at: int | None = None):
        self.loader, self.crash_at, self.calls = loader, crash_at, 0

    def next_step(self, global_batch: int, micro_batch: int) -> list[dict[str, torch.Tensor]]:
        self.calls += 1
        if self.calls == self.crash_at:
            raise Crash(f"killed at step {self.calls}")
        return self.loader.next_step(global_batch, micro_batch)

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.loader.load_state_dict(state)


TOTAL = 12
CFG = TrainConfig(steps=TOTAL, seq_len=16, micro_batch=4, global_batch=8, progress=False, device="cpu",
                  eval_every=4, ckpt_every=3, optim=OptimConfig(lr_scale_dim=32),
                  schedule=ScheduleConfig(warmup_frac=0.25, decay_frac=0.5, final_lr_frac=0.1))


def run_fit(ckpt_dir: Path | None, *, init_seed: int,
            crash_at: int | None = None) -> tuple[GPT, Any, CrashingRows, dict[int, float]]:
    model = make_model(init_seed)
    data = CrashingRows(PackedRows(small_split(), CFG.seq_len, seed=CFG.seed), crash_at)
    losses: dict[int, float] = {}

    def log(point: dict[str, float], step: int) -> None:
        for key, value in point.items():
            if key.endswith("loss") and "eval" not in key:
                losses[step] = value

    result = fit(model, LM, data, CFG, dist=Dist(0, 1, 0, torch.device("cpu")), total_steps=TOTAL,
                 d_model=model.config.d_model, ckpt_dir=ckpt_dir, log=log,
                 evaluate=lambda m: {"weight_sum": float(sum(p.detach().double().sum() for p in m.parameters()))})
    return model, result, data, losses


def test_fit_resumed_after_a_crash_ends_with_identical_weights(tmp_path: Path) -> None:
    n_rows = PackedRows(small_split(), CFG.seq_len, seed=CFG.seed).plan(0).n_rows
    assert 3 * 8 < n_rows < TOTAL * 8  # the resumed part crosses into the second epoch

    ref, ref_result, ref_data, ref_losses = run_fit(tmp_path / "ref", init_seed=0)
    assert ref_result.resumed_from is None and ref_result.steps == TOTAL
    assert sorted(ref_losses) == list(range(1, TOTAL + 1))
    assert sorted(ref_result.evals) == [0, 4, 8, 12]
    # no checkpoint is written at the last step: the newest is at step 9
    assert checkpoint.latest(tmp_path / "ref") == tmp_path / "ref" / "step-00000009"

    ckpt_dir = tmp_path / "crashed"
    with pytest.raises(Crash):
        run_fit(ckpt_dir, init_seed=0, crash_at=8)  # steps 1-7 done, checkpoints at 3 and 6
    assert checkpoint.latest(ckpt_dir) == ckpt_dir / "step-00000006"
    assert [p.name for p in ckpt_dir.glob("step-*")] == ["step-00000006"]
    snapshot = tmp_path / "snapshot"
    shutil.copytree(ckpt_dir, snapshot)

    # resumed with another initialisation: everything comes from the checkpoint
    model, result, data, losses = run_fit(ckpt_dir, init_seed=99)
    assert result.resumed_from == 6
    assert result.steps == TOTAL and result.tokens == ref_result.tokens == TOTAL * 8 * 16
    assert data.calls == TOTAL - 6
    assert data.state_dict() == ref_data.state_dict()
    assert_same_weights(weights(ref), weights(model))
    assert result.train_loss == ref_result.train_loss
    assert losses == {s: v for s, v in ref_losses.items() if s > 6}  # the same loss at every step
    assert result.evals == ref_result.evals  # evals before the crash came back from the checkpoint

    # a checkpoint directory is self-contained: the copy resumes the same way
    again, _, _, _ = run_fit(snapshot, init_seed=5)
    assert_same_weights(weights(ref), weights(again))
