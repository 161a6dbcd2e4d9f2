"""Collective wrappers over a ParallelContext's groups (the only communication library code
does outside megatron-core's own)."""

from typing import Iterable

import torch
import torch.distributed as dist


def all_reduce_sum(tensors: Iterable[torch.Tensor], ctx) -> None:
    """Sum in place over the TP, PP and DP groups: the whole grid of ranks."""
    if ctx is None or ctx.world_size == 1:
        return
    for t in tensors:
        buf = t.to(ctx.device)  # NCCL reduces device tensors only; no copy under gloo/CPU
        for group in (ctx.tp_group, ctx.pp_group, ctx.dp_group):
            dist.all_reduce(buf, group=group)
        if buf is not t:
            t.copy_(buf)
