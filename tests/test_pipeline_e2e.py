"""End to end: the whole DAG on the ci profile, in throwaway copies of this repo.

Shows: `dvc repro` completes; a second repro runs nothing; a second clean copy gives the
same artifact digests (determinism); the Prefect flow gives the same dvc.lock; MLflow
holds one parent and a child per stage with params, metrics and input digests; the audit
chain verifies.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.pipeline_repo import TIMED, copy_repo, lock_outs, run

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent
STAGES = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])


@pytest.fixture(scope="module")
def repo(ci_dag: Path) -> Path:
    return ci_dag


def test_outputs_and_metrics(repo: Path) -> None:
    for stage in STAGES:
        metrics = json.loads((repo / "data" / stage / "metrics.json").read_text())
        assert metrics, stage
    mix = json.loads((repo / "data/mix/metrics.json").read_text())
    assert mix["total"]["train_docs"] > 0 and mix["total"]["val_docs"] > 0
    for name, st in mix["sources"].items():
        assert st["docs_in"] == st["docs_kept"] + st["docs_dropped"], name
        assert abs(st["achieved_share"] - st["target_share"]) < 0.05, name
    tok = json.loads((repo / "data/tokenizer/metrics.json").read_text())
    assert set(tok["bytes_per_token_by_source"]) == set(mix["sources"])
    pre = json.loads((repo / "data/pretrain/metrics.json").read_text())
    # the model learned context: a clear margin below the unigram floor on the same targets
    assert pre["val_bpb"] < pre["unigram_val_bpb"] - 0.5, pre
    model_cfg = json.loads((repo / "data/pretrain/model/config.json").read_text())
    assert model_cfg["tokenizer"]["source"] == "data/tokenizer/tokenizer"
    gov = json.loads((repo / "data/govern/metrics.json").read_text())
    for key in ("skipped_fraction", "val_loss_governed", "val_loss_ungoverned", "wall_clock_governed_s",
                "wall_clock_ungoverned_s"):
        assert key in gov, key
    assert 0 < gov["skipped_fraction"] < 1 and gov["transitions"] > 0, gov
    # continued training on the mid-training mix keeps what pretraining learned
    assert gov["val_bpb_governed"] < pre["unigram_val_bpb"] - 0.5, gov
    governance = json.loads((repo / "data/govern/governance.json").read_text())
    assert governance["budget"]["max_sum"] <= governance["budget"]["budget"]
    assert governance["budget"]["steps_checked"] == gov["steps"]
    sft = json.loads((repo / "data/sft/metrics.json").read_text())
    assert sft["heldout_loss_after"] < sft["heldout_loss_before"], sft  # SFT lowers held-out assistant loss
    assert sft["heldout_accuracy_n"] > 0 and sft["conversations"]["heldout"] > 0, sft
    chat_cfg = json.loads((repo / "data/sft/model/tokenizer/tokenizer_config.json").read_text())
    assert "chat_template" in chat_cfg
    rl = json.loads((repo / "data/rl/metrics.json").read_text())
    for key in ("heldout_accuracy_sft", "heldout_accuracy_rl", "heldout_n", "heldout_gain", "heldout_gain_se"):
        assert key in rl, key
    # the ci profile's 4 DPO steps on a 20-step SFT model need not move the held-out margin either way
    # (the default run's does: bench/results/rl_dpo.md; tests/test_rl.py checks DPO on its own pairs)
    assert all(math.isfinite(rl[k]) for k in ("dpo_margin_before", "dpo_margin_after", "heldout_gain_se")), rl
    assert rl["heldout_n"] > 0 and rl["grpo_steps"] > 0 and rl["dpo_steps"] > 0, rl
    forget = json.loads((repo / "data/forgetting/metrics.json").read_text())
    bench = forget["benchmark"]
    assert len(bench["domains"]) >= 4 and len(bench["seeds"]) >= 3, bench
    assert set(bench["methods"]) == {"ce", "ewc", "ewc_online", "replay", "persistence", "governed"}
    for name, m in bench["methods"].items():
        for key in ("acc", "bwt", "fwt"):
            assert math.isfinite(m[key]["mean"]) and m[key]["std"] >= 0, (name, key)
    assert set(forget["retention"]) == {"pretrain", "govern", "sft", "rl"}
    assert all(set(r["by_source"]) == set(mix["sources"]) for r in forget["retention"].values())
    assert forget["gate"]["passed"] and forget["gate"]["action"] == "pass", forget["gate"]
    matrices = json.loads((repo / "data/forgetting/matrices.json").read_text())
    R = matrices["methods"]["ce"]["mean"]["val_acc"]["R"]
    assert len(R) == len(R[0]) == len(bench["domains"])
    plots = sorted(p.name for p in (repo / "data/forgetting/plots").iterdir())
    assert plots == sorted(["acc_bwt.png", "retention.png"] + [f"heatmap_{m}.png" for m in bench["methods"]])
    forge = json.loads((repo / "data/forge/metrics.json").read_text())
    assert forge["n_facts"] == 12 and forge["n_deltas_forged"] == 2, forge
    for m in (forge, forge["unrouted"], forge["baselines"]["lora"], forge["baselines"]["full"]):
        assert all(0.0 <= m[k] <= 1.0 for k in ("efficacy", "paraphrase", "locality")), m
    assert forge["locality"] == 1.0 and forge["routing"]["unrelated_prompts_activating"] == 0.0, forge
    assert set(forge["retention"]) == {"rl", "forge", "forge_unrouted", "lora", "full"}
    assert all(set(r["by_source"]) == set(mix["sources"]) for r in forge["retention"].values())
    assert forge["retention"]["forge"] == forge["retention"]["rl"]  # no subject in the mix: nothing routed
    assert forge["removal"]["logits_equal_after_removal"] and forge["removal"]["base_sha256_unchanged"], forge
    assert forge["consolidation"]["accepted"] and forge["registry"]["ids"] == [forge["consolidation"]["id"]]
    adapters = sorted(p.name for p in (repo / "data/forge/adapters").iterdir())
    assert adapters == forge["registry"]["ids"] == sorted(p.name for p in (repo / "data/forge/registry").iterdir())
    assert sorted(p.name for p in (repo / "data/forge/adapters" / adapters[0]).iterdir()) == [
        "adapter_config.json", "adapter_model.safetensors"]



def test_report_renders_offline_with_every_stage_number(repo: Path) -> None:
    """report.html opens in headless Chromium with the network cut off: every figure decodes, every
    table is there, and every stage's headline numbers are on the page and in report.md."""
    from lmforge.export.card import headline_rows
    from tests.report.browser import render

    out = repo / "data/report"
    metrics = json.loads((out / "metrics.json").read_text())
    figures = sorted(p.name for p in (out / "figures").iterdir())
    assert metrics["stages"] == len(STAGES) - 1 == metrics["stages_audited"]
    assert metrics["figures"] == len(figures) >= 10  # curves, governance x2, forgetting heatmaps, forging
    page = render(out / "report.html")
    assert page["blocked"] == []
    assert sorted(i["name"] for i in page["images"]) == figures
    assert all(i["complete"] and i["width"] > 100 and i["height"] > 100 for i in page["images"]), page["images"]
    assert len(page["tables"]) == metrics["tables"] and all(n >= 2 for n in page["tables"])
    md = (out / "report.md").read_text()
    stage_metrics = {s: json.loads((repo / f"data/{s}/metrics.json").read_text()) for s in STAGES[:-1]}
    rows = headline_rows(stage_metrics)
    assert {stage for stage, _, _ in rows} == set(STAGES[:-1])  # every stage has headline numbers
    for stage, label, value in rows:
        assert f"| {stage} | {label} | {value} |" in md
        assert value in page["text"], (stage, label, value)
    for figure in figures:
        assert f"(figures/{figure})" in md
    assert json.loads((repo / "audit/head.json").read_text())["hash"] != "" and "This run" in page["text"]


def test_dvc_plots_show_the_training_curves(repo: Path) -> None:
    shown = json.loads(run(repo, "dvc", "plots", "show", "--json").stdout)["data"]
    assert {"training loss", "validation loss", "rl reward"} <= set(shown)
    # one plot, three stages' files: what `dvc plots diff <rev>` lays side by side per revision
    values = shown["training loss"][0]["content"]["data"]["values"]
    assert len({v["filename"] for v in values}) == 3 and all(float(v["loss"]) > 0 for v in values)
    for stage in ("pretrain", "govern", "sft", "rl"):
        tables = sorted((repo / f"data/{stage}/curves").glob("*.csv"))
        assert tables and all(t.read_text().startswith("step,") for t in tables), stage


def test_export_parity_card_and_lineage(repo: Path) -> None:
    """The released model in every format agrees with ours; the card cites every stage and the
    audit head the export found; the registered version walks back to pretraining in MLflow."""
    import mlflow

    from lmforge.digest import sha256_path
    from lmforge.lineage import chain, stages

    exp = json.loads((repo / "data/export/metrics.json").read_text())
    for fmt in ("transformers", "onnxruntime"):
        p = exp["parity"][fmt]
        assert p["max_abs_logit_diff"] <= 1e-4 and p["greedy_same"] and p["tokens"] == 32, (fmt, p)
    f32 = exp["parity"]["gguf_f32"]
    assert f32["tensors_identical"] == f32["tensors"] and f32["greedy_same"], f32
    forge = json.loads((repo / "data/forge/metrics.json").read_text())
    assert exp["deltas"] == "adapters" and exp["adapters"] == forge["registry"]["ids"]
    assert sorted(p.name for p in (repo / "data/export/hf/adapters").iterdir()) == forge["registry"]["ids"]
    card = (repo / "data/export/README.md").read_text()
    pre = json.loads((repo / "data/pretrain/metrics.json").read_text())
    assert f"| pretrain | val bits per byte | {pre['val_bpb']:.4g} |" in card
    assert f"| forge | locality | {forge['locality']:.4g} |" in card
    for stage in ("mix", "tokenizer", "govern", "sft", "rl", "forgetting"):
        assert f"| {stage} | " in card, stage
    manifest = json.loads((repo / "data/sources/manifest.json").read_text())
    assert all(s["sha256"] in card for s in manifest["sources"].values())
    records = [json.loads(x) for x in (repo / "audit/log.jsonl").read_text().splitlines()]
    at = next(i for i, r in enumerate(records) if r.get("stage") == "export" and r["kind"] == "stage")
    register = records[at - 1]
    assert register["kind"] == "model.register" and register["version"] == "1" and register["alias"] == "release"
    assert f"head `{records[at - 2]['hash']}` after {at - 1} records" in card  # the chain as export found it

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    steps = chain(client, "lmforge", "release")
    assert stages(steps) == ["pretrain", "govern", "sft", "rl", "forge", "export"]
    for step in steps:
        assert step["sha256"] == sha256_path(repo / step["path"]), step
        assert client.get_run(step["run_id"]).data.tags["lmforge.stage"] == step["stage"]
    assert steps[-1]["model_id"] == register["mlflow_model_id"]
    forgetting = next(r for r in records if r.get("stage") == "forgetting" and r["kind"] == "stage")
    read = client.get_run(forgetting["mlflow_run_id"]).inputs.model_inputs
    assert {s["model_id"] for s in steps[:4]} == {m.model_id for m in read}  # it evaluated all four models


def test_export_with_the_deltas_merged_in(repo: Path, tmp_path: Path) -> None:
    """`deltas: merged`: the facts are in the weights (no adapters shipped), and every runtime
    still matches lmforge's own model with the deltas added in."""
    merged = shutil.copytree(repo, tmp_path / "merged", symlinks=True)
    params = yaml.safe_load((merged / "params.yaml").read_text())
    params["export"]["deltas"] = "merged"
    (merged / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(merged, "python", "-m", "stages.export")
    exp = json.loads((merged / "data/export/metrics.json").read_text())
    forge = json.loads((repo / "data/forge/metrics.json").read_text())
    assert exp["deltas"] == "merged" and exp["adapters"] == forge["registry"]["ids"]
    assert not (merged / "data/export/hf/adapters").exists()
    assert all(p["greedy_same"] for k, p in exp["parity"].items() if k != "gguf_q8_0"), exp["parity"]
    weights = "data/export/hf/model.safetensors"
    assert (merged / weights).read_bytes() != (repo / weights).read_bytes()  # the deltas are in


def test_exported_adapters_load_with_peft_on_the_exported_model(repo: Path) -> None:
    """transformers + PEFT on data/export/hf with a shipped adapter = lmforge with that delta on."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from lmforge.forge.delta import applied, weights_sha256
    from lmforge.forge.registry import Registry
    from lmforge.weights import load_model

    model, _ = load_model(repo / "data/rl/model")
    [entry] = Registry(repo / "data/forge/registry", base_sha256=weights_sha256(model)).entries()
    hf = AutoModelForCausalLM.from_pretrained(str(repo / "data/export/hf"))
    peft_model = PeftModel.from_pretrained(hf, str(repo / "data/export/hf/adapters" / entry.id)).eval()
    x = torch.tensor([[0, 5, 9, 17, 33, 2, 81]])
    with torch.no_grad(), applied(model, [entry.delta]):
        ours = model(x)
    with torch.no_grad():
        theirs = peft_model(x).logits
        assert (theirs - ours).abs().max() <= 1e-4
        assert (theirs - model(x)).abs().max() > 1e-3  # the adapter does change the model


def _stage_with_user_file(repo: Path, tmp_path: Path, stage: str, rel: str, lines: list[object],
                          edit: Callable[[dict[str, Any]], None]) -> tuple[subprocess.CompletedProcess[str], bytes, bytes]:
    """Run `stage` in a copy of `repo` after writing a user file at `rel`, declaring its directory as
    a dependency (what a user does) and editing the stage's params: the process, and the stage's
    metrics.json before and after."""
    bad = shutil.copytree(repo, tmp_path / "bad", symlinks=True)
    (bad / rel).parent.mkdir(parents=True)
    (bad / rel).write_text("".join(json.dumps(x) + "\n" for x in lines), encoding="utf-8")
    dvc = yaml.safe_load((bad / "dvc.yaml").read_text())
    dvc["stages"][stage]["deps"].append(str(Path(rel).parent))
    (bad / "dvc.yaml").write_text(yaml.safe_dump(dvc, sort_keys=False))
    params = yaml.safe_load((bad / "params.yaml").read_text())
    edit(params[stage])
    (bad / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = (bad / f"data/{stage}/metrics.json").read_bytes()
    proc = run(bad, "python", "-m", f"stages.{stage}", check=False)
    return proc, before, (bad / f"data/{stage}/metrics.json").read_bytes()


def test_bad_conversation_file_stops_sft_naming_the_line(repo: Path, tmp_path: Path) -> None:
    user = {"role": "user", "content": "Hi?"}
    proc, before, after = _stage_with_user_file(
        repo, tmp_path, "sft", "chats/mine.jsonl",
        [{"messages": [user, {"role": "assistant", "content": "Hello."}]}, {"messages": [user]}],
        lambda p: p["data"]["sets"].append({"name": "mine", "kind": "jsonl", "path": "chats/mine.jsonl"}))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "chats/mine.jsonl:2: the conversation has no assistant turn" in proc.stderr, proc.stderr[-2000:]
    assert after == before  # the published outputs are untouched


def test_identical_preference_pair_stops_rl_naming_the_line(repo: Path, tmp_path: Path) -> None:
    pair = {"messages": [{"role": "user", "content": "What is 2 + 3?"}], "chosen": "2 + 3 = 5\n#### 5"}
    proc, before, after = _stage_with_user_file(
        repo, tmp_path, "rl", "prefs/mine.jsonl",
        [{**pair, "rejected": "2 + 3 = 6\n#### 6"}, {**pair, "rejected": pair["chosen"]}],
        lambda p: p["dpo"].update(files=["prefs/mine.jsonl"]))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "pair prefs/mine.jsonl:2: chosen and rejected replies are identical" in proc.stderr, proc.stderr[-2000:]
    assert after == before


def test_forgetting_gate_refuses_a_model_that_forgot_too_much_and_audits_it(repo: Path, tmp_path: Path) -> None:
    gate = tmp_path / "gate"
    shutil.copytree(repo, gate, symlinks=True)
    table = json.loads((gate / "data/forgetting/metrics.json").read_text())["retention"]
    # a pair of models where the first has the higher val bpb: the gate's increase is known
    model, reference = max(((a, b) for a in table for b in table if a != b),
                           key=lambda ab: table[ab[0]]["val_bpb"] / table[ab[1]]["val_bpb"])
    rise = table[model]["val_bpb"] / table[reference]["val_bpb"] - 1.0
    assert rise > 0
    log = gate / "audit/log.jsonl"

    def forgetting(limit: float, on_fail: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
        params = yaml.safe_load((gate / "params.yaml").read_text())
        params["forgetting"]["gate"].update(model=model, reference=reference, max_increase=limit, on_fail=on_fail)
        params["forgetting"]["benchmark"]["enabled"] = False  # the gate runs first; the benchmark is tested above
        (gate / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
        proc = run(gate, "python", "-m", "stages.forgetting", check=False)
        records = [json.loads(x) for x in log.read_text().splitlines()]
        return proc, records

    before = (gate / "data/forgetting/metrics.json").read_bytes()
    proc, records = forgetting(rise / 2, "fail")
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert f"forgetting gate: the {model} model forgot too much to be released" in proc.stderr
    assert records[-1]["kind"] == "forgetting.gate" and records[-1]["action"] == "fail"  # audited, no stage record
    assert records[-1]["increase"] == pytest.approx(rise, abs=1e-5)
    assert (gate / "data/forgetting/metrics.json").read_bytes() == before  # nothing released

    proc, records = forgetting(rise / 2, "warn")
    assert proc.returncode == 0 and "warning (gate.on_fail: warn)" in proc.stderr, proc.stderr[-2000:]
    assert [r["kind"] for r in records[-2:]] == ["forgetting.gate", "stage"] and records[-2]["action"] == "warn"

    proc, records = forgetting(rise * 2, "fail")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert records[-2]["kind"] == "forgetting.gate" and records[-2]["passed"] and records[-1]["stage"] == "forgetting"
    assert json.loads((gate / "data/forgetting/metrics.json").read_text())["gate"]["action"] == "pass"
    run(gate, "lmforge", "audit", "verify", "--log", "audit/log.jsonl")


def test_second_repro_runs_nothing(repo: Path) -> None:
    proc = run(repo, "dvc", "repro")
    assert "Running stage" not in proc.stdout
    assert "Data and pipelines are up to date" in proc.stdout
    assert "up to date" in run(repo, "dvc", "status").stdout


def test_audit_chain_records_every_stage(repo: Path) -> None:
    run(repo, "lmforge", "audit", "verify", "--log", "audit/log.jsonl", "--mlflow")
    records = [json.loads(x) for x in (repo / "audit/log.jsonl").read_text().splitlines()]
    assert records[0]["kind"] == "genesis"
    stages = [r for r in records if r["kind"] == "stage"]
    assert [r["stage"] for r in stages] == STAGES
    # the governor's decisions, in order, just before the govern stage's own record
    decisions = [r for r in records if r["kind"] == "govern.transition"]
    events = json.loads((repo / "data/govern/governance.json").read_text())["events"]
    assert [{k: r[k] for k in ("step", "group", "old", "new", "signals")} for r in decisions] == events
    at = records.index(next(r for r in stages if r["stage"] == "govern"))
    assert records[at - len(decisions):at] == decisions
    assert all(r["stage"] == "govern" and r["mlflow_run_id"] == records[at]["mlflow_run_id"] for r in decisions)
    gates = [r for r in records if r["kind"] == "forgetting.gate"]
    assert len(gates) == 1 and gates[0]["action"] == "pass"
    assert records[records.index(gates[0]) + 1]["stage"] == "forgetting"
    at = records.index(next(r for r in stages if r["stage"] == "forge"))
    assert [r["kind"] for r in records[at - 3:at]] == ["forge.register", "forge.register", "forge.consolidate"]
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    for r in stages:
        assert r["mlflow_run_id"] and r["code"]["commit"]
        assert set(r["outputs"]) == {o["path"] for o in lock["stages"][r["stage"]]["outs"]}


def test_mlflow_parent_and_children(repo: Path, tmp_path: Path) -> None:
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{repo / 'mlflow.db'}")
    exp = client.get_experiment_by_name("lmforge")
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if r.data.tags.get("lmforge.role") == "pipeline"]
    children = [r for r in runs if r.data.tags.get("lmforge.role") == "stage"]
    assert len(parents) == 1
    assert sorted(r.info.run_name for r in children) == sorted(STAGES)
    for c in children:
        assert c.data.tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert c.data.params and c.data.metrics and c.inputs.dataset_inputs, c.info.run_name
        assert all(len(d.dataset.digest) > 8 for d in c.inputs.dataset_inputs)
    forgetting = next(c for c in children if c.info.run_name == "forgetting")
    figures = {a.path for a in client.list_artifacts(forgetting.info.run_id, "plots")}
    assert {"plots/acc_bwt.png", "plots/retention.png", "plots/heatmap_replay.png"} <= figures
    head = (repo / "audit/head.json").read_text()
    assert parents[0].data.tags["audit.head_hash"] == json.loads(head)["hash"]
    # the report is on the pipeline's own run, byte for byte
    logged = {a.path for a in client.list_artifacts(parents[0].info.run_id)}
    assert {"report.html", "report.md"} <= logged
    local = Path(client.download_artifacts(parents[0].info.run_id, "report.html", str(tmp_path)))
    assert local.read_bytes() == (repo / "data/report/report.html").read_bytes()


def test_clean_rerun_through_the_prefect_flow_is_byte_identical(repo: Path, tmp_path: Path) -> None:
    """A second clean run, in a fresh copy, driven by the Prefect flow instead of `dvc repro`: the
    same artifacts and the same dvc.lock. (tests/test_stack.py makes a third, through deployments.)"""
    flowed = copy_repo(tmp_path / "flow")
    run(flowed, "python", "-m", "pipelines.flow")
    assert "up to date" in run(flowed, "dvc", "status").stdout
    assert lock_outs(flowed) == lock_outs(repo)

    def deps(r: Path) -> dict[str, object]:
        lock = yaml.safe_load((r / "dvc.lock").read_text())
        # a TIMED output read by a later stage (govern's metrics.json, by export for the card)
        # differs between runs by its wall-clocks alone: compare it without them, as lock_outs does
        timed = {p: v for p, v in lock_outs(r).items() if p in TIMED}
        return {name: (st["cmd"], [{**d, "md5": timed[d["path"]], "size": None} if d["path"] in timed else d
                                   for d in st.get("deps", [])], st.get("params"))
                for name, st in lock["stages"].items()}

    assert deps(flowed) == deps(repo)


def test_cut_tail_with_rewritten_head_is_caught_by_the_mlflow_anchor(repo: Path, tmp_path: Path) -> None:
    """A forger who cuts the last record AND rewrites head.json to match still loses to MLflow."""
    import shutil

    from lmforge.digest import canonical_json

    audit_copy = tmp_path / "audit"
    shutil.copytree(repo / "audit", audit_copy)
    lines = (audit_copy / "log.jsonl").read_text().splitlines(keepends=True)
    (audit_copy / "log.jsonl").write_text("".join(lines[:-1]))
    last = json.loads(lines[-2])
    (audit_copy / "head.json").write_text(canonical_json({"count": len(lines) - 1, "hash": last["hash"],
                                                          "updated": last["ts"]}))
    log = str(audit_copy / "log.jsonl")
    assert run(repo, "lmforge", "audit", "verify", "--log", log).returncode == 0  # locally consistent
    proc = run(repo, "lmforge", "audit", "verify", "--log", log, "--mlflow", check=False)
    assert proc.returncode == 1 and "BROKEN" in proc.stderr and "anchor" in proc.stderr


@pytest.mark.parametrize(("edit", "message"), [
    (lambda g: g["groups"][4].update(patterns=["lm_head.weight", "lm_head.bias"]),
     "govern.groups[4] (head): pattern 'lm_head.bias' matches no parameter"),
    (lambda g: g["groups"].append({"name": "extra", "level": 1, "patterns": ["model.layers.0.mlp.*"]}),
     "parameter 'model.layers.0.mlp.gate_proj.weight' is in 2 groups (mlp, extra)"),
    (lambda g: g["governor"].update(cool_ratio=1.5), "govern.governor: cool_ratio must be in (0, 1] (got 1.5)"),
], ids=["pattern-matches-nothing", "overlapping-groups", "threshold-out-of-range"])
def test_bad_govern_params_stop_the_stage_naming_the_problem(repo: Path, tmp_path: Path,
                                                            edit: Callable[[dict[str, Any]], None],
                                                            message: str) -> None:
    bad = shutil.copytree(repo, tmp_path / "bad", symlinks=True)
    params = yaml.safe_load((bad / "params.yaml").read_text())
    edit(params["govern"])
    (bad / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = (bad / "data/govern/metrics.json").read_bytes()
    proc = run(bad, "python", "-m", "stages.govern", check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr, proc.stderr[-2000:]
    assert (bad / "data/govern/metrics.json").read_bytes() == before  # the published outputs are untouched
