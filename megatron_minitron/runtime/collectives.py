"""Collective wrappers: over a ParallelContext's groups (`all_reduce_sum`), and the
vocab-parallel losses' thin, in-place, gradient-free ones over one group.

The logit losses run inside a custom autograd Function that computes its own gradient, so their
collectives never need autograd: they only combine per-token partial results (max, sum of exps,
sum of divergence terms, top-k candidates) over the tensor-parallel group. With `group=None` or a
group of one they do nothing, so the loss math runs (and is tested) without a process group."""

from typing import Iterable, Tuple

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


def group_rank_size(group) -> Tuple[int, int]:
    """(tp_rank, tp_size) of this process in `group`; (0, 1) without a process group."""
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def spans_ranks(group) -> bool:
    """Whether `group` splits the vocabulary over more than one rank."""
    return group is not None and dist.is_initialized() and dist.get_world_size(group) > 1


def all_reduce_max_(x: torch.Tensor, group) -> torch.Tensor:
    if spans_ranks(group):
        dist.all_reduce(x, op=dist.ReduceOp.MAX, group=group)
    return x


def all_reduce_sum_(x: torch.Tensor, group) -> torch.Tensor:
    if spans_ranks(group):
        dist.all_reduce(x, op=dist.ReduceOp.SUM, group=group)
    return x


def all_gather_last_dim(x: torch.Tensor, group) -> torch.Tensor:
    """[..., k] on each rank -> [..., tp * k], rank-major (rank 0's k columns first)."""
    if not spans_ranks(group):
        return x
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, x.contiguous(), group=group)
    return torch.cat(parts, dim=-1)
