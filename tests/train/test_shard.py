"""FSDP2 (`train.parallel: fsdp`) through the one training loop, in two gloo processes on CPU:
the same weights as DDP and as one process, bit for bit; a killed sharded run resumes to the
same weights; what cannot be sharded is refused with the fix."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from lmforge.errors import ConfigError
from lmforge.train.dist import Dist
from lmforge.train.loop import LM, fit
from tests.train.test_checkpoint import CFG, make_model

ROOT = Path(__file__).resolve().parents[2]
WORKER = "tests/train/shard_worker.py"


def train(out: Path, parallel: str, *, procs: int, global_batch: int = 8, micro_batch: int = 4,
          crash_at: int | None = None) -> int:
    out.mkdir(parents=True, exist_ok=True)
    args = [str(out), parallel, str(global_batch), str(micro_batch), *([str(crash_at)] if crash_at else [])]
    launch = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={procs}"]
              if procs > 1 else [sys.executable])
    env = dict(os.environ, PYTHONPATH=f"{ROOT / 'lib'}{os.pathsep}{ROOT}", OMP_NUM_THREADS="1")
    proc = subprocess.run([*launch, WORKER, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    if crash_at is None:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.returncode


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "weights.safetensors"))


def result(out: Path) -> dict:
    return json.loads((out / "result.json").read_text())


def assert_identical(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa), [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert result(a)["losses"] == result(b)["losses"]
    assert result(a)["evals"] == result(b)["evals"]


@pytest.mark.slow
def test_fsdp_matches_one_process_and_ddp_bit_for_bit(tmp_path: Path) -> None:
    # one micro-batch per process: two processes sum the same two gradients one process does
    train(tmp_path / "one", "ddp", procs=1)
    train(tmp_path / "fsdp", "fsdp", procs=2)
    assert result(tmp_path / "fsdp")["world"] == 2 and result(tmp_path / "fsdp")["plain"] == "GPT"
    assert_identical(tmp_path / "one", tmp_path / "fsdp")
    # gradient accumulation (two micro-batches per process): FSDP sums as DDP does
    train(tmp_path / "ddp2", "ddp", procs=2, micro_batch=2)
    train(tmp_path / "fsdp2", "fsdp", procs=2, micro_batch=2)
    assert_identical(tmp_path / "ddp2", tmp_path / "fsdp2")


@pytest.mark.slow
def test_a_killed_sharded_run_resumes_to_the_same_weights(tmp_path: Path) -> None:
    train(tmp_path / "ref", "fsdp", procs=2)
    assert train(tmp_path / "run", "fsdp", procs=2, crash_at=8) != 0  # checkpoints at steps 3 and 6
    assert json.loads((tmp_path / "run/ckpt/latest.json").read_text())["step"] == 6
    train(tmp_path / "run", "fsdp", procs=2)
    assert result(tmp_path / "run")["resumed_from"] == 6
    assert weights(tmp_path / "run").keys() == weights(tmp_path / "ref").keys()
    assert all(torch.equal(v, weights(tmp_path / "ref")[k]) for k, v in weights(tmp_path / "run").items())
    # checkpoints hold whole tensors: the sharded run's checkpoint resumes in one process too
    assert train(tmp_path / "other", "fsdp", procs=2, crash_at=8) != 0
    train(tmp_path / "other", "ddp", procs=1)
    assert result(tmp_path / "other")["resumed_from"] == 6
    assert all(torch.equal(v, weights(tmp_path / "ref")[k]) for k, v in weights(tmp_path / "other").items())


class Follows:
    follows_model = True


def test_fsdp_refuses_a_plugin_and_model_sampled_data() -> None:
    cfg = CFG.model_copy(update={"parallel": "fsdp"})
    two = Dist(0, 2, 0, torch.device("cpu"))  # refused before any process group is needed
    model = make_model(0)
    with pytest.raises(ConfigError, match="plug-in.*parallel: ddp"):
        fit(model, LM, Follows(), cfg, dist=two, total_steps=1, d_model=32, plugin=object())  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="sampled from the model.*parallel: ddp"):
        fit(model, LM, Follows(), cfg, dist=two, total_steps=1, d_model=32)  # type: ignore[arg-type]
