"""One training run for tests/train/test_shard.py, launched plainly or under torchrun.

    python tests/train/shard_worker.py OUT PARALLEL GLOBAL MICRO [CRASH_AT]

Trains the tiny GPT of test_checkpoint through `fit` (Muon + AdamW, gradients clipped at every
step, checkpoints every 3 steps in OUT/ckpt); rank 0 writes OUT/weights.safetensors and
OUT/result.json (loss and gradient norm by step, evaluations). CRASH_AT: the run dies (exit 3)
when asked for that step's data, as a killed process would.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file

torch.set_num_threads(1)  # the same kernels in every process, whatever the process count

from lmforge.train import dist as tdist  # noqa: E402
from lmforge.train.config import TrainConfig  # noqa: E402
from lmforge.train.data import PackedRows  # noqa: E402
from lmforge.train.loop import LM, fit  # noqa: E402
from tests.train.test_checkpoint import CFG, TOTAL, CrashingRows, make_model, small_split  # noqa: E402


def main(out: Path, parallel: str, global_batch: int, micro_batch: int, crash_at: int | None) -> int:
    cfg = TrainConfig.model_validate(CFG.model_dump() | {
        "parallel": parallel, "global_batch": global_batch, "micro_batch": micro_batch,
        "grad_clip": 0.05})  # small enough to clip at every step
    dist = tdist.setup("cpu")
    try:
        model = make_model(0)
        loader = PackedRows(small_split(), cfg.seq_len, seed=cfg.seed, rank=dist.rank, world=dist.world)
        data = CrashingRows(loader, crash_at)
        curves: dict[int, tuple[float, float]] = {}

        def log(point: dict[str, float], step: int) -> None:
            if "train/loss" in point:
                curves[step] = (point["train/loss"], point["train/grad_norm"])

        try:
            result = fit(model, LM, data, cfg, dist=dist, total_steps=TOTAL, d_model=model.config.d_model,
                         ckpt_dir=out / "ckpt", log=log,
                         evaluate=lambda m: {"weight_sum": float(sum(p.detach().double().sum() for p in m.parameters()))})
        except Exception as e:  # the "killed" run: leave without writing anything
            if type(e).__name__ == "Crash":
                return 3
            raise
        if dist.main:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "weights.safetensors"))
            (out / "result.json").write_text(json.dumps({
                "world": dist.world, "resumed_from": result.resumed_from, "losses": curves,
                "evals": {str(k): v for k, v in result.evals.items()}, "device": str(next(model.parameters()).device),
                "plain": type(model).__name__}, sort_keys=True))
    finally:
        tdist.teardown()
    return 0


if __name__ == "__main__":
    a = sys.argv[1:]
    sys.exit(main(Path(a[0]), a[1], int(a[2]), int(a[3]), int(a[4]) if len(a) > 4 else None))
