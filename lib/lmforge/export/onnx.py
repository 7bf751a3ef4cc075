"""ONNX: the logits graph, `input_ids (batch, sequence) int64 -> logits (batch, sequence, vocab)`.

    from lmforge.export.onnx import write_onnx, parity
    write_onnx(model, "out/model.onnx")           # torch.onnx's dynamo exporter, one self-contained file
    parity(model, "out/model.onnx", prompts)      # onnxruntime vs ours: logits diff, greedy tokens

Batch and sequence are dynamic (sequence up to the model's `max_seq_len`). The graph has no KV
cache: it is the full-sequence forward, what scoring and simple serving need; greedy decoding
through it recomputes the whole sequence per token.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch

from ..model import GPT
from .hf import greedy

STACK_TRACE = "pkg.torch.onnx.stack_trace"


class _Logits(torch.nn.Module):
    """The model with the one input the graph takes (no targets, no cache)."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


def _drop_node_stack_traces(nodes: Any) -> None:
    for node in nodes:
        keep = [p for p in node.metadata_props if p.key != STACK_TRACE]
        del node.metadata_props[:]
        node.metadata_props.extend(keep)
        for attr in node.attribute:
            for g in [attr.g] if attr.HasField("g") else list(attr.graphs):
                _drop_stack_traces(g)


def _drop_stack_traces(graph: Any) -> None:
    """The exporter records each node's Python stack trace, absolute paths included: two clean
    runs from two checkouts would write different bytes. The rest of the metadata stays."""
    _drop_node_stack_traces(graph.node)


def write_onnx(model: GPT, path: str | Path, *, opset: int = 18) -> dict[str, Any]:
    """Export the logits graph to `path` (weights inside the file); return a summary."""
    # the exporter warns about torchvision ops it cannot register: noise for a language model
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    model = model.eval()
    batch = torch.export.Dim("batch", min=1, max=1024)
    seq = torch.export.Dim("sequence", min=1, max=model.config.max_seq_len)
    example = torch.zeros((2, min(8, model.config.max_seq_len)), dtype=torch.long)
    program = torch.onnx.export(_Logits(model).eval(), (example,), None, dynamo=True, opset_version=opset,
                                input_names=["input_ids"], output_names=["logits"],
                                dynamic_shapes={"input_ids": {0: batch, 1: seq}}, verbose=False)
    proto = program.model_proto
    _drop_stack_traces(proto.graph)
    for fn in proto.functions:
        _drop_node_stack_traces(fn.node)
    onnx.save_model(proto, str(path))
    return {"opset": opset, "inputs": ["input_ids"], "outputs": ["logits"], "bytes": Path(path).stat().st_size}


def session(path: str | Path) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def onnx_greedy(sess: Any, prompt: Sequence[int], n: int) -> list[int]:
    ids = list(prompt)
    for _ in range(n):
        logits = sess.run(["logits"], {"input_ids": np.asarray([ids], dtype=np.int64)})[0]
        ids.append(int(logits[0, -1].argmax()))
    return ids[len(prompt):]


def parity(model: GPT, path: str | Path, prompts: Sequence[Sequence[int]], n_tokens: int = 32) -> dict[str, Any]:
    """onnxruntime vs our model, fp32: the max abs logit difference over the prompts (one
    batch, equal lengths cut to the shortest, plus each prompt alone) and greedy tokens."""
    sess = session(path)
    diff = 0.0
    shortest = min(len(p) for p in prompts)
    batches = [[list(p)[:shortest] for p in prompts], *[[list(p)] for p in prompts]]
    with torch.no_grad():
        for rows in batches:
            x = torch.tensor(rows)
            theirs = sess.run(["logits"], {"input_ids": x.numpy()})[0]
            diff = max(diff, float(np.abs(theirs - model(x).numpy()).max()))
    same = [onnx_greedy(sess, p, n_tokens) == mine for p, mine in zip(prompts, greedy(model, prompts, n_tokens),
                                                                        strict=True)]
    return {"max_abs_logit_diff": diff, "greedy_same": all(same), "greedy_same_prompts": sum(same),
            "prompts": len(prompts), "tokens": n_tokens, "batch_rows": len(prompts)}
