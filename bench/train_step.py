"""Training-step benchmark: our GPT against Hugging Face's LlamaForCausalLM of the same shapes.

    .venv/bin/python bench/train_step.py                                   # CPU, float32, ~3 min on 2 cores
    .venv/bin/python bench/train_step.py --repeats 5                        # quicker
    .venv/bin/python bench/train_step.py --device cuda --dtype bf16 --compile   # a GPU: adds MFU
    bench/gpu.sh                                                            # that, at 135M and 480M

Writes bench/results/train_step.txt (the table below, also printed). Results are written, not
asserted; the one hard check is that both models start from the same loss.

One step is what a training loop does per batch: forward with the loss, backward, AdamW step,
zero (free) the gradients. Both models are built in one process from one state dict (ours,
loaded into Hugging Face's with strict=True), see the same batch on the same device with the
same threads, optimizer and dtype, and attend through the same kernel
(`scaled_dot_product_attention`: Hugging Face with attn_implementation="sdpa"). Each computes
its loss its own way: Hugging Face from `labels` (shifted inside, last position ignored), ours
from next-token `targets` with -1 in the last position: the same positions, the same value.

- time: steps alternate between the models (ours, HF, then HF, ours, ...) after --warmup steps
  each; the median (and the best) of --repeats steps per model. tokens/s = batch x seq / median.
- step peak: the most memory tensors held during one step beyond what was held when it began
  (the weights and AdamW's moments, the same for both): activations kept for the backward,
  gradients, temporaries. On CUDA torch.cuda.max_memory_allocated; on the CPU, where
  tracemalloc does not see torch's allocator, the allocations and frees torch.profiler records
  (profile_memory=True), summed in time order.
- RSS growth (CPU, Linux): in a fresh process per model, the peak resident memory of the
  process (VmHWM) during its first three steps minus its resident memory just before them: what
  the operating system sees, allocator caching included; it also counts AdamW's moments,
  created by the first step.
- where the time goes (CPU): the same profiled step's self CPU time per op, summed into
  matmuls, attention, the AdamW step and everything else.
- MFU (CUDA, with a known GPU): ModelConfig.flops_per_token(seq) x tokens/s over the GPU's
  dense peak for the dtype (PEAK_FLOPS). Both models do the same FLOPs.

--compile wraps both models in torch.compile. --dtype bf16 runs forward and loss under bf16
autocast with float32 weights (mixed precision), as lmforge.train does. On CUDA, fp32 matmuls
may use TF32 (both models; the fp32 peaks in PEAK_FLOPS are TF32's).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "lib"))

import torch  # noqa: E402
import transformers  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from lmforge.atomic import write_text  # noqa: E402
from lmforge.model import GPT, ModelConfig  # noqa: E402

RESULTS = REPO / "bench" / "results"
MODELS = ("ours", "hf")
GOAL = 1.3  # tokens/s, ours over Hugging Face's
LABEL = {"ours": "ours (lmforge GPT)", "hf": "HF LlamaForCausalLM"}

# Dense peak FLOP/s by GPU name fragment (first match wins) and compute dtype.
PEAK_FLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989e12, "fp32": 494e12}),       # SXM; fp32 = TF32 tensor cores
    ("H100 PCIe", {"bf16": 756e12, "fp32": 378e12}),
    ("H100", {"bf16": 989e12, "fp32": 494e12}),       # SXM / HBM3
    ("A100", {"bf16": 312e12, "fp32": 156e12}),
]


def configs(seq: int) -> dict[str, ModelConfig]:
    """d3: the default tiny profile's model (params.yaml: pretrain); d4 and d8: deeper and wider
    (heads of 64, vocab 2048: the CPU set). d12: the one-GPU profile's model (profiles/gpu1.yaml,
    ~135M parameters); d20: ~480M parameters; both heads of 128 and a 32k vocab (the GPU set, the
    sizes issue 3's reference figures are for)."""
    small = {"aspect_ratio": 64, "head_dim": 64, "max_seq_len": max(512, seq)}
    large = {"aspect_ratio": 64, "head_dim": 128, "max_seq_len": max(2048, seq)}
    return {
        "d3": ModelConfig.from_depth(3, 2048, **small),
        "d4": ModelConfig.from_depth(4, 2048, **small),
        "d8": ModelConfig.from_depth(8, 2048, **small),
        "d12": ModelConfig.from_depth(12, 32768, **large),
        "d20": ModelConfig.from_depth(20, 32768, **large),
    }


DEFAULT_CONFIGS = {"cpu": ["d3", "d4", "d8"], "cuda": ["d12", "d20"]}


def hf_config(cfg: ModelConfig) -> LlamaConfig:
    """Hugging Face's name for each of our shapes: the same network."""
    return LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.d_model, intermediate_size=cfg.d_mlp,
        num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta, tie_word_embeddings=cfg.tie_embeddings, attention_bias=False,
        mlp_bias=False, attn_implementation="sdpa",
    )


def build(cfg: ModelConfig, device: torch.device) -> dict[str, torch.nn.Module]:
    """Both models with identical weights (ours initialised, its state dict loaded into HF's)."""
    torch.manual_seed(0)
    ours = GPT(cfg)
    hf = LlamaForCausalLM(hf_config(cfg)).float()
    hf.load_state_dict(ours.state_dict(), strict=True)
    return {"ours": ours.to(device).train(), "hf": hf.to(device).train()}


def batch(cfg: ModelConfig, b: int, t: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Input ids (b, t) and our targets: the next token, -1 (ignored) in the last position."""
    idx = torch.randint(0, cfg.vocab_size, (b, t), generator=torch.Generator().manual_seed(1))
    targets = torch.cat([idx[:, 1:], torch.full((b, 1), -1)], dim=1)
    return idx.to(device), targets.to(device)


def make_step(name: str, model: torch.nn.Module, idx: torch.Tensor, targets: torch.Tensor,
              p: argparse.Namespace, device: torch.device) -> Callable[[], torch.Tensor]:
    """One training step of `model` as a closure returning the loss (synchronised on CUDA)."""
    net = torch.compile(model) if p.compile else model
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")
    autocast: AbstractContextManager[Any] = (
        torch.autocast(device.type, dtype=torch.bfloat16) if p.dtype == "bf16" else nullcontext()
    )

    def loss() -> torch.Tensor:
        if name == "ours":
            return net(idx, targets)
        return net(input_ids=idx, labels=idx).loss

    def step() -> torch.Tensor:
        with autocast:
            out = loss()
        out.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # here, not first: no gradients are held between steps
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return out.detach()

    return step


def category(event: Any) -> str:
    """Which part of a step a profiled op belongs to (its own time, children excluded)."""
    parent = event
    while parent is not None:
        if parent.name.startswith("Optimizer.step"):
            return "optimizer"
        parent = parent.cpu_parent
    if event.name in ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm"):
        return "matmul"
    if "scaled_dot_product" in event.name:
        return "attention"
    return "other"


CATEGORIES = {
    "matmul": "matmuls (aten::mm, addmm)",
    "attention": "attention (SDPA flash kernels)",
    "optimizer": "AdamW step",
    "other": "everything else (norms, rotary, SwiGLU, loss, adds, copies, autograd)",
}


def profile_step(step: Callable[[], Any], device: torch.device, steps: int = 3) -> tuple[int, dict[str, float] | None]:
    """(peak bytes of tensors allocated during a step beyond those live when it began, CPU ms
    per category per step, the mean of `steps` profiled steps; None on CUDA)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        return torch.cuda.max_memory_allocated(device) - base, None
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        for _ in range(steps):
            step()  # each ends with what it began with: no gradients, the same weights and moments
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    ms = dict.fromkeys(CATEGORIES, 0.0)
    for e in prof.events():
        if e.name != "[memory]":
            ms[category(e)] += e.self_cpu_time_total / 1e3 / steps
    return peak, ms


def _status_kb(key: str) -> int:
    """A `key:  N kB` line of /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


def probe_rss(p: argparse.Namespace) -> None:
    """(Child process) print the RSS growth over three steps of one model as JSON.

    The peak is VmHWM, reset to the current RSS just before the steps (/proc/self/clear_refs);
    getrusage's ru_maxrss would not do: Linux carries the parent's peak into a child."""
    device = torch.device("cpu")
    cfg = configs(p.seq)[p.probe_config]
    torch.manual_seed(0)  # only the model measured is ever built here (weights do not matter)
    model = GPT(cfg) if p.probe_model == "ours" else LlamaForCausalLM(hf_config(cfg)).float()
    idx, targets = batch(cfg, p.batch, p.seq, device)
    step = make_step(p.probe_model, model, idx, targets, p, device)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status_kb("VmRSS")
    for _ in range(3):
        step()
    print(json.dumps({"rss_growth": _status_kb("VmHWM") - before}))


def rss_growth(name: str, config: str, p: argparse.Namespace) -> int:
    """RSS growth of `name` on `config`, measured in a fresh interpreter."""
    cmd = [sys.executable, __file__, "--probe-model", name, "--probe-config", config, "--batch", str(p.batch),
           "--seq", str(p.seq), "--dtype", p.dtype, "--threads", str(torch.get_num_threads())]
    if p.compile:
        cmd.append("--compile")
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    return json.loads(out)["rss_growth"]


def peak_flops(device: torch.device, dtype: str) -> tuple[str, float | None]:
    if device.type != "cuda":
        with contextlib.suppress(OSError):
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip(), None
        return platform.processor() or platform.machine(), None
    name = torch.cuda.get_device_name(device)
    for fragment, peaks in PEAK_FLOPS:
        if fragment in name:
            return name, peaks.get(dtype)
    return name, None


def run_config(label: str, cfg: ModelConfig, p: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    models = build(cfg, device)
    idx, targets = batch(cfg, p.batch, p.seq, device)
    steps = {name: make_step(name, models[name], idx, targets, p, device) for name in MODELS}
    first = {name: float(steps[name]()) for name in MODELS}
    if abs(first["ours"] - first["hf"]) > (1e-4 if p.dtype == "fp32" else 5e-2):
        raise SystemExit(f"{label}: the models disagree on the first loss: {first}")
    for _ in range(p.warmup - 1):
        for name in MODELS:
            steps[name]()
    times: dict[str, list[float]] = {name: [] for name in MODELS}
    for r in range(p.repeats):
        for name in MODELS if r % 2 == 0 else MODELS[::-1]:
            t = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - t)
    tokens = p.batch * p.seq
    _, peak = peak_flops(device, p.dtype)
    out: dict[str, Any] = {"params": cfg.n_params(), "config": cfg.model_dump(), "first_loss": first, "models": {}}
    for name in MODELS:
        med = statistics.median(times[name])
        out["models"][name] = {
            "step_s": med,
            "step_s_min": min(times[name]),
            "tokens_per_s": tokens / med,
            "mfu": cfg.flops_per_token(p.seq) * tokens / med / peak if peak else None,
            "step_peak_bytes": None,
            "profile_ms": None,
            "rss_growth_bytes": rss_growth(name, label, p) if device.type == "cpu" else None,
        }
    for name in MODELS:  # after the timings: profiling slows the step it watches
        out["models"][name]["step_peak_bytes"], out["models"][name]["profile_ms"] = profile_step(steps[name], device)
    ms = {name: round(m["step_s"] * 1e3) for name, m in out["models"].items()}
    print(f"{label} done: step ms {ms}", flush=True)
    return out


def render(r: dict[str, Any]) -> str:
    m = r["machine"]
    lines = [
        "# Training step: ours vs Hugging Face LlamaForCausalLM",
        "",
        f"{m['device']} ({m['device_name']}), {m['threads']} threads, dtype {r['dtype']}"
        f"{' (bf16 autocast, float32 weights)' if r['dtype'] == 'bf16' else ''}, compile {r['compile']}; "
        f"torch {m['torch']}, transformers {m['transformers']}; load average {m['load_average_at_start']:.1f} at start.",
        f"One step = forward with loss + backward + AdamW step + zero_grad on a batch of {r['batch']} x {r['seq']} "
        f"tokens; median of {r['repeats']} interleaved steps after {r['warmup']} warmup steps per model.",
        "",
        "| config | model | params | step ms (median) | step ms (best) | tokens/s | step peak MB | RSS growth MB | MFU |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def mb(v: int | None) -> str:
        return "-" if v is None else f"{v / 2**20:.1f}"

    for label, c in r["configs"].items():
        for name in MODELS:
            x = c["models"][name]
            mfu = "-" if x["mfu"] is None else f"{100 * x['mfu']:.1f}%"
            lines.append(f"| {label} | {LABEL[name]} | {c['params'] / 1e6:.2f}M | {x['step_s'] * 1e3:.1f} "
                         f"| {x['step_s_min'] * 1e3:.1f} "
                         f"| {x['tokens_per_s']:,.0f} | {mb(x['step_peak_bytes'])} | {mb(x['rss_growth_bytes'])} | {mfu} |")
    lines += ["", "| config | tokens/s ours / HF (median) | (best) | step peak ours / HF | RSS growth ours / HF |",
              "|---|---:|---:|---:|---:|"]
    for label, c in r["configs"].items():
        o, h = c["models"]["ours"], c["models"]["hf"]
        rss = (f"{o['rss_growth_bytes'] / h['rss_growth_bytes']:.2f}x"
               if o["rss_growth_bytes"] and h["rss_growth_bytes"] else "-")
        lines.append(f"| {label} | {o['tokens_per_s'] / h['tokens_per_s']:.2f}x | {h['step_s_min'] / o['step_s_min']:.2f}x "
                     f"| {o['step_peak_bytes'] / h['step_peak_bytes']:.2f}x | {rss} |")
    if all(c["models"]["ours"]["profile_ms"] for c in r["configs"].values()):
        lines += ["", "Where a step's time goes (torch.profiler self CPU time per op, ms per step, the mean of three "
                  "profiled steps per model; the profiler adds its own overhead to every op):", "",
                  "| config | part | ours | HF | HF - ours |", "|---|---|---:|---:|---:|"]
        for label, c in r["configs"].items():
            o, h = c["models"]["ours"]["profile_ms"], c["models"]["hf"]["profile_ms"]
            for key, text in CATEGORIES.items():
                lines.append(f"| {label} | {text} | {o[key]:.1f} | {h[key]:.1f} | {h[key] - o[key]:+.1f} |")
            lines.append(f"| {label} | total | {sum(o.values()):.1f} | {sum(h.values()):.1f} "
                         f"| {sum(h.values()) - sum(o.values()):+.1f} |")
        lines.append("")
        for label, c in r["configs"].items():
            o = c["models"]["ours"]["profile_ms"]
            share = (o["matmul"] + o["attention"] + o["optimizer"]) / sum(o.values())
            ceiling = c["models"]["hf"]["step_s"] / (share * c["models"]["ours"]["step_s"])
            lines.append(f"- {label}: matmuls, attention and AdamW (the same kernels in both) are {100 * share:.0f}% "
                         f"of our profiled step; were everything else free, ours / HF would be {ceiling:.2f}x "
                         f"(from the unprofiled medians). Hugging Face runs more ops, each paying the "
                         f"profiler's overhead: the profiled 'everything else' gap overstates the real one.")
            cfg = ModelConfig.model_validate(c["config"])
            gflop = cfg.flops_per_token(0) * r["batch"] * r["seq"] / 1e9  # no context: the matmuls' FLOPs alone
            rate = {n: gflop / (c["models"][n]["profile_ms"]["matmul"] / 1e3) for n in MODELS}
            lines.append(f"- {label}: the matmuls ({gflop:.1f} GFLOP per step: 6 x matmul parameters x tokens) ran at "
                         f"{rate['ours']:.0f} GFLOP/s in ours and {rate['hf']:.0f} in HF's (over their profiled "
                         f"time): compare with the host's peak for the dtype, which bounds both.")
    lines += [""]
    for label, c in r["configs"].items():
        cfg = c["config"]
        lines.append(f"- {label}: d_model {cfg['d_model']}, {cfg['n_layer']} layers, {cfg['n_head']} heads "
                     f"({cfg['n_kv_head']} KV) of {cfg['head_dim']}, d_mlp {cfg['d_mlp']}, vocab {cfg['vocab_size']}; "
                     f"first loss ours {c['first_loss']['ours']:.6f}, HF {c['first_loss']['hf']:.6f}.")
    lines += [
        "- step peak: the most tensor memory held during one step beyond what was held when it began "
        "(activations kept for the backward, gradients, temporaries); "
        + ("torch.cuda.max_memory_allocated." if m["device"] == "cuda" else
           "torch.profiler's allocation records (profile_memory=True) summed in time order."),
        *(["- RSS growth: a fresh process per model; peak resident memory (VmHWM) during its first three "
           "steps minus resident memory just before them (includes AdamW's moments and allocator caching)."]
          if m["device"] == "cpu" else []),
        "- Timings are medians on a shared machine; the ratios come from interleaved steps in one process.",
        "- goal: tokens/s ours / HF >= 1.3x: " + ", ".join(
            f"{label} {'met' if c['models']['ours']['tokens_per_s'] >= GOAL * c['models']['hf']['tokens_per_s'] else 'NOT met'}"
            for label, c in r["configs"].items()) + ".",
        f"- Regenerate: `.venv/bin/python bench/train_step.py{r['argv']}`.",
        "",
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", help="cpu or cuda (default: %(default)s)")
    ap.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                    help="fp32, or bf16 autocast over float32 weights (default: %(default)s)")
    ap.add_argument("--compile", action="store_true", help="torch.compile both models")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps per model (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=11, help="timed steps per model (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--configs", nargs="*", choices=("d3", "d4", "d8", "d12", "d20"), default=None,
                    help="which shapes (default: d3 d4 d8 on the CPU, d12 d20 on CUDA)")
    ap.add_argument("--out", type=Path, default=RESULTS / "train_step.txt")
    ap.add_argument("--probe-model", choices=MODELS, help=argparse.SUPPRESS)
    ap.add_argument("--probe-config", help=argparse.SUPPRESS)
    p = ap.parse_args()

    transformers.logging.set_verbosity_error()
    if p.threads:
        torch.set_num_threads(p.threads)
    if p.probe_model:
        probe_rss(p)
        return
    device = torch.device(p.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # both models; fp32 on a GPU means TF32 matmuls
    load = os.getloadavg()[0]
    device_name, _ = peak_flops(device, p.dtype)
    cfgs = configs(p.seq)
    chosen = p.configs or DEFAULT_CONFIGS.get(device.type, list(cfgs))
    result: dict[str, Any] = {
        "machine": {"device": device.type, "device_name": device_name, "threads": torch.get_num_threads(),
                    "cpus": os.cpu_count(), "torch": torch.__version__, "transformers": transformers.__version__,
                    "python": platform.python_version(), "load_average_at_start": load},
        "dtype": p.dtype, "compile": p.compile, "batch": p.batch, "seq": p.seq, "warmup": p.warmup,
        "repeats": p.repeats, "argv": "".join(f" {a}" if " " not in a else f" '{a}'" for a in sys.argv[1:]),
        "configs": {label: run_config(label, cfgs[label], p, device) for label in chosen},
    }
    text = render(result)
    p.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(p.out, text)
    print(text)


if __name__ == "__main__":
    main()
