"""The pretrain stage as users run it: killed with SIGKILL and re-run, and data parallel.

In a throwaway copy of the repo (ci profile, a tiny pretrain config), with the tokenizer stage
run once:
- an uninterrupted `python -m stages.pretrain` gives reference weights;
- a run killed with `kill -9` at random moments and re-run until it finishes ends with
  byte-identical weights and metrics (it resumed from its checkpoints at least once);
- the same stage with `meta.gpus: 2` in dvc.yaml (it relaunches itself under torchrun: two gloo
  processes on CPU), run end to end by `dvc repro`, writes byte-identical outputs and the same
  loss curve as one process with the same global batch, replicated (DDP) and sharded (FSDP2).
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.pipeline_repo import copy_repo, env_for, run

pytestmark = pytest.mark.slow

TINY = {
    "model": {"depth": 1, "aspect_ratio": 64, "head_dim": 32},
    "train": {"seq_len": 64, "micro_batch": 4, "global_batch": 8, "steps": 40, "eval_every": 20,
              "eval_rows": 16, "ckpt_every": 4, "progress": False},
}


def set_pretrain(repo: Path, **train: object) -> None:
    from ruamel.yaml import YAML

    yaml = YAML()
    path = repo / "params.yaml"
    params = yaml.load(path.read_text())
    for section, values in TINY.items():
        params["pretrain"][section].update(values)
    params["pretrain"]["train"].update(train)
    with path.open("w") as fh:
        yaml.dump(params, fh)


def weights_digest(repo: Path) -> str:
    return hashlib.sha256((repo / "data/pretrain/model/model.safetensors").read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    r = copy_repo(tmp_path_factory.mktemp("pretrain") / "repo")
    set_pretrain(r)
    run(r, "dvc", "repro", "tokenizer")
    return r


@pytest.fixture(scope="module")
def reference(repo: Path) -> tuple[str, str, float]:
    t0 = time.perf_counter()
    run(repo, "python", "-m", "stages.pretrain")
    elapsed = time.perf_counter() - t0
    return weights_digest(repo), (repo / "data/pretrain/metrics.json").read_text(), elapsed


def test_metrics_beat_the_unigram_floor(repo: Path, reference: tuple[str, str, float]) -> None:
    metrics = json.loads(reference[1])
    assert metrics["steps"] == 40 and metrics["tokens_seen"] == 40 * 8 * 64
    assert metrics["val_bpb"] < metrics["unigram_val_bpb"]
    assert not (repo / ".lmforge/scratch/pretrain").exists()  # checkpoints go once the stage is done


def latest_step(repo: Path) -> int:
    steps = [json.loads(p.read_text())["step"] for p in repo.glob(".lmforge/scratch/pretrain/*/ckpt/latest.json")]
    return max(steps, default=0)


def test_kill_minus_nine_then_rerun_gives_the_same_weights(repo: Path, reference: tuple[str, str, float]) -> None:
    """Three runs are killed: one at a random moment of its start-up, two at a random moment
    after a random checkpoint (so the re-runs must resume); a fourth run finishes."""
    digest, metrics, _ = reference
    shutil.rmtree(repo / "data/pretrain/model")  # no outputs: the first run starts from nothing
    (repo / "data/pretrain/metrics.json").unlink()
    rng = random.Random(7)
    plan = [("startup", rng.uniform(0.5, 3.0)), ("after", rng.choice([8, 12, 16])), ("after", rng.choice([24, 28, 32]))]
    killed_at = []
    for kind, point in plan:
        proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=repo, env=env_for(repo),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if kind == "startup":
            time.sleep(point)
        else:
            deadline = time.monotonic() + 300
            while latest_step(repo) < point and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            time.sleep(rng.uniform(0.0, 0.3))
        assert proc.poll() is None, "the stage finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(latest_step(repo))
    assert killed_at[-1] >= 24, killed_at
    proc = run(repo, "python", "-m", "stages.pretrain")
    assert f"(step {killed_at[-1]} of 40)" in proc.stderr  # it resumed from the last checkpoint
    assert weights_digest(repo) == digest
    assert (repo / "data/pretrain/metrics.json").read_text() == metrics
    assert not list((repo / "data").glob(".pretrain.*"))  # no staging or half-swapped dirs left


def kill_after_step(repo: Path, step: int) -> None:
    """Start the stage and SIGKILL it once a checkpoint of `step` or later exists."""
    proc = subprocess.Popen([sys.executable, "-m", "stages.pretrain"], cwd=repo, env=env_for(repo),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while latest_step(repo) < step and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def test_corrupt_checkpoint_is_refused_naming_the_file(repo: Path, reference: tuple[str, str, float]) -> None:
    before = (repo / "data/pretrain/model/model.safetensors").read_bytes()
    kill_after_step(repo, 8)
    pointer = next(repo.glob(".lmforge/scratch/pretrain/*/ckpt/latest.json"))
    ckpt = pointer.parent / json.loads(pointer.read_text())["checkpoint"]  # the one a re-run would load
    weights = ckpt / "model.safetensors"
    raw = bytearray(weights.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    weights.write_bytes(bytes(raw))
    bad = run(repo, "python", "-m", "stages.pretrain", check=False)
    assert bad.returncode == 2, bad.stderr[-2000:]
    assert f"{ckpt.name}/model.safetensors: sha256 does not match" in bad.stderr
    assert "Traceback" not in bad.stderr
    assert (repo / "data/pretrain/model/model.safetensors").read_bytes() == before  # outputs untouched
    shutil.rmtree(repo / ".lmforge/scratch/pretrain")


def test_a_killed_run_is_not_resumed_by_other_code(repo: Path, reference: tuple[str, str, float]) -> None:
    """Checkpoints are keyed by code too: after an edit to a code dependency the re-run starts over
    instead of finishing a run that an older version began."""
    digest, _, _ = reference
    kill_after_step(repo, 8)
    assert latest_step(repo) >= 8
    code = repo / "stages" / "pretrain.py"
    original = code.read_text()
    try:
        code.write_text(original + "# an edit\n")
        again = run(repo, "python", "-m", "stages.pretrain")
    finally:
        code.write_text(original)
    assert "resuming from checkpoint" not in again.stderr
    assert weights_digest(repo) == digest  # the edit changed nothing that computes
    assert not (repo / ".lmforge/scratch/pretrain").exists()  # the stale checkpoints went too


def test_bad_model_config_and_missing_shard_are_clear_errors(repo: Path, reference: tuple[str, str, float]) -> None:
    params = (repo / "params.yaml").read_text()
    try:
        set_pretrain(repo)
        text = (repo / "params.yaml").read_text().replace("    kv_ratio: 1\n", "    kv_ratio: 1\n    n_head: 3\n", 1)
        (repo / "params.yaml").write_text(text)
        bad = run(repo, "python", "-m", "stages.pretrain", check=False)
        assert bad.returncode == 2 and "pretrain.model" in bad.stderr and "n_head" in bad.stderr, bad.stderr
        assert "d_model" in bad.stderr and "Traceback" not in bad.stderr
    finally:
        (repo / "params.yaml").write_text(params)
    shard = repo / "data/tokenizer/tokens/train.bin"
    saved = shard.read_bytes()
    try:
        shard.unlink()
        bad = run(repo, "python", "-m", "stages.pretrain", check=False)
        assert bad.returncode == 2 and "tokens/train.bin" in bad.stderr and "re-run the tokenizer stage" in bad.stderr
    finally:
        shard.write_bytes(saved)


def outputs(repo: Path) -> dict[str, str]:
    """Every file of the stage's declared outputs (not the .gitignore DVC keeps beside them)."""
    out = repo / "data/pretrain"
    files = [out / "metrics.json", *(out / "model").rglob("*")]
    return {p.relative_to(out).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(files) if p.is_file()}


def test_meta_gpus_two_runs_torchrun_and_matches_one_process_byte_for_byte(
        repo: Path, reference: tuple[str, str, float]) -> None:
    import mlflow
    from ruamel.yaml import YAML

    digest, metrics, _ = reference
    run(repo, "python", "-m", "stages.pretrain")  # the single-process outputs, as the reference wrote them
    assert weights_digest(repo) == digest
    single = outputs(repo)
    yaml = YAML()
    dvc_yaml = repo / "dvc.yaml"
    saved = dvc_yaml.read_text()
    doc = yaml.load(saved)
    doc["stages"]["pretrain"]["meta"]["gpus"] = 2
    with dvc_yaml.open("w") as fh:
        yaml.dump(doc, fh)
    run(repo, "dvc", "commit", "--force", "pretrain")  # dvc.lock records the single-process run
    # DVC leaves meta out of the stage's hash: for it, nothing changed (placement is not a param)
    assert "up to date" in run(repo, "dvc", "status", "pretrain").stdout
    params = repo / "params.yaml"
    saved_params = params.read_text()
    try:
        run(repo, "dvc", "repro", "--single-item", "--force", "pretrain", timeout=900)
        assert outputs(repo) == single  # weights, config, metrics.json: every byte
        set_pretrain(repo, parallel="fsdp")  # sharded (FSDP2) instead of replicated: the same bytes again
        run(repo, "dvc", "repro", "--single-item", "pretrain", timeout=900)
        assert outputs(repo) == single
    finally:
        dvc_yaml.write_text(saved)
        params.write_text(saved_params)
    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmforge")
    runs = client.search_runs([exp.experiment_id], "attributes.run_name = 'pretrain' and attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time ASC"])
    assert [r.data.tags["lmforge.processes"] for r in runs[-3:]] == ["1", "2", "2"]
    curves = []
    for r in runs[-3:]:  # one process, then two (DDP), then two (FSDP)
        history = sorted(client.get_metric_history(r.info.run_id, "train/loss"), key=lambda m: m.step)
        curves.append([m.value for m in history])
    assert len(curves[0]) == 40 and curves[2] == curves[1] == curves[0]
