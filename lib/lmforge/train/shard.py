"""Sharded data parallel training (FSDP2) for models whose training state outgrows one device.

With `train.parallel: fsdp` under torchrun, `fit` trains a working copy of the model made by
`shard(model, dist)`: every transformer block, and the rest of the model as the root, goes
through `torch.distributed.fsdp.fully_shard`. Each process then holds 1/world of the weights,
gradients and optimizer state (AdamW's moments, Muon's momentum), gathers a block's weights
only while that block computes, and reduce-scatters the gradients so it updates its own rows.

The caller's model stays an ordinary module on the CPU while the copy trains: `gather_into`
copies the current weights into it (on every process) for an evaluation and at the end, so
evaluation code and everything a stage does after `fit` see a plain model, as with DDP.

Checkpoints store whole tensors (`full`), so a checkpoint written by a sharded run resumes
at any process count or parallel mode; `like` cuts a stored tensor to a parameter's shard.
`clip_grad_norm` clips by a norm that does not depend on how the parameters are sharded.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from ..errors import ConfigError
from .dist import Dist


def shard(model: nn.Module, dist: Dist) -> nn.Module:
    """A copy of `model` (a GPT), sharded over the processes, on this process's device."""
    layers = getattr(getattr(model, "model", None), "layers", None)
    if layers is None:
        raise ConfigError(f"train.parallel: fsdp shards a GPT's blocks; {type(model).__name__} has none "
                          "(fix: parallel: ddp)")
    work = copy.deepcopy(model)
    mesh = init_device_mesh(dist.device.type, (dist.world,))
    for block in work.model.layers:  # type: ignore[union-attr]
        fully_shard(block, mesh=mesh)
    fully_shard(work, mesh=mesh)  # the root: embeddings, final norm, head
    return work.to(dist.device)


def gather_into(work: nn.Module, model: nn.Module) -> None:
    """Copy the sharded copy's whole weights into the plain `model` (a collective: every
    process calls it, and every process's `model` receives them)."""
    whole = get_model_state_dict(work, options=StateDictOptions(full_state_dict=True))
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in whole.items()})


def full(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind a shard (a collective for a DTensor), or `t` itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def like(ref: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """`value` (a whole tensor) laid out as `ref`: this process's shard when `ref` is a
    DTensor (cut locally, no communication: every process holds the whole value)."""
    if not isinstance(ref, DTensor):
        return value
    return distribute_tensor(value.to(ref.device), ref.device_mesh, ref.placements, src_data_rank=None)


@torch.no_grad()
def clip_grad_norm(params: Iterable[torch.Tensor], max_norm: float) -> float:
    """Scale the gradients to a global L2 norm of at most `max_norm`; return the norm before.

    The norm is the same number however the parameters are sharded, so one process, DDP and
    FSDP clip by the same factor and stay bit-identical (torch's clip_grad_norm_ sums a sharded
    parameter's squares shard by shard, in another order). Each row's sum of squares (float64)
    is computed where the row lives, whole; a sharded parameter's rows are gathered (one number
    per row, a small collective); the rows and then the parameters are summed in one order."""
    grads = [p.grad for p in params if p.grad is not None]
    total = 0.0
    for g in grads:
        local = g.to_local() if isinstance(g, DTensor) else g
        n = local.shape[0] if local.dim() else 1
        rows = local.reshape(n, math.prod(local.shape[1:])).square().sum(dim=1, dtype=torch.float64)
        if isinstance(g, DTensor):
            rows = DTensor.from_local(rows, g.device_mesh, g.placements, shape=torch.Size([g.shape[0]]),
                                      stride=(1,)).full_tensor()
        total += float(rows.sum())
    norm = math.sqrt(total)
    coef = max_norm / (norm + 1e-6)
    if coef < 1.0:
        for g in grads:
            g.mul_(coef)
    return norm
