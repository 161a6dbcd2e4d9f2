"""Statistics that sum across ranks, and the scores computed from them after the reduction.

Every statistic is a fp32/fp64 tensor in *global* shape ([num_layers, ffn_hidden_size] for
neurons, ...), zero where this rank owns nothing: TP shards fill their own columns, pipeline
stages their own layer rows, and statistics that TP ranks see identically are kept by TP rank 0
only. A plain sum over the TP, PP and DP groups then yields the global statistics, whatever the
layout; the nonlinear aggregation over samples happens afterwards (`finalize`).
"""

from typing import Dict, Optional

import torch

from megatron_minitron.config.model import ModelConfig

Stats = Dict[str, torch.Tensor]


def new_stats(model: ModelConfig, device: Optional[torch.device] = None) -> Stats:
    """Zeroed statistics for every score of `model` (sums and sums of squares per sample), on
    the activations' device so that the hooks add without a copy or a sync."""
    L, h, f, nq = model.num_layers, model.hidden_size, model.ffn_hidden_size, \
        model.num_attention_heads
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
    return {
        "samples": torch.zeros((), dtype=torch.float64, device=device),
        "neuron_sum": z(L, f), "neuron_sumsq": z(L, f),
        "head_sum": z(L, nq), "head_sumsq": z(L, nq),
        # rows: 2*(l-1) input_layernorm of layer l, 2*(l-1)+1 pre_mlp_layernorm, 2L final norm
        "norm_sum": z(2 * L + 1, h), "norm_sumsq": z(2 * L + 1, h),
        "cos_sum": torch.zeros(L, dtype=torch.float64, device=device),
        "cos_tokens": torch.zeros(L, dtype=torch.float64, device=device),
    }


class TokenMask:
    """The current micro-batch's loss_mask for the hooks: tokens with mask 0 (padding) must not
    count in any statistic. `value` is None when every token counts, so the common unpadded
    batch pays nothing."""

    def __init__(self):
        self.value: Optional[torch.Tensor] = None

    def set(self, loss_mask: torch.Tensor) -> None:
        m = loss_mask.float()
        self.value = None if bool((m > 0).all()) else m.t().unsqueeze(-1)  # [b, s] -> [s, b, 1]


def reduce_sequence(x: torch.Tensor, how: str, mask: Optional[torch.Tensor] = None
                    ) -> torch.Tensor:
    """One value per sample and channel over the tokens with mask > 0 (all if mask is None).
    # [s, b, c], mask [s, b, 1] -> [b, c]"""
    if mask is None and how == "mean":  # the default: |x| is exact in bf16, sum it in fp32
        return x.abs().mean(dim=0, dtype=torch.float32)
    x = x.float()
    if mask is None:
        if how == "l2":
            return x.pow(2).sum(dim=0).sqrt()
        if how == "var":
            return x.var(dim=0, unbiased=False)
    else:
        n = mask.sum(dim=0).clamp_min(1.0)  # [b, 1]
        if how == "mean":
            return (x.abs() * mask).sum(dim=0) / n
        if how == "l2":
            return (x.pow(2) * mask).sum(dim=0).sqrt()
        if how == "var":
            mean = (x * mask).sum(dim=0) / n
            return ((x - mean).pow(2) * mask).sum(dim=0) / n
    raise ValueError(f"unknown sequence aggregation {how!r}")


def head_norms(x: torch.Tensor, kv_channels: int) -> torch.Tensor:
    """Per-token L2 norm of each head's attention output.
    # [s, b, np*hn] -> [s, b, np, hn] -> [s, b, np]"""
    s, b, _ = x.shape
    return x.float().reshape(s, b, -1, kv_channels).norm(dim=-1)


def projected_head_norms(x: torch.Tensor, proj_weight: torch.Tensor, kv_channels: int
                         ) -> torch.Tensor:
    """Per-token L2 norm of what each head writes to the residual stream, ||W_h x_h|| with W_h
    the head's columns of linear_proj, through the heads' Gram matrices W_h^T W_h (never a
    [s, b, np, hidden] tensor). A head whose output projection is small scores small here,
    where head_norms cannot see it. Under TP the row-parallel weight holds this rank's heads'
    columns over the full hidden size, so the norm is exact on each rank.
    # x [s, b, np*hn], proj_weight [hidden, np*hn] -> [s, b, np]"""
    s, b, _ = x.shape
    w = proj_weight.float().reshape(proj_weight.shape[0], -1, kv_channels)  # [h, np, hn]
    gram = torch.einsum("hnd,hne->nde", w, w)  # [np, hn, hn]
    xh = x.float().reshape(s, b, -1, kv_channels)
    sq = torch.einsum("sbnd,nde->sbne", xh, gram).mul_(xh).sum(dim=-1)
    return sq.clamp_min_(0).sqrt_()


def accumulate(stats: Stats, name: str, row: int, col0: int, per_sample: torch.Tensor) -> None:
    """Add per-sample values [b, c] into stats[name_sum/sumsq][row, col0:col0+c]."""
    per_sample = per_sample.float()
    c = per_sample.shape[-1]
    stats[f"{name}_sum"][row, col0:col0 + c] += per_sample.sum(dim=0)
    stats[f"{name}_sumsq"][row, col0:col0 + c] += per_sample.pow(2).sum(dim=0)


def finalize(total: torch.Tensor, total_sq: torch.Tensor, n: float, how: str) -> torch.Tensor:
    """Aggregate over samples from the reduced sums: mean, L2 norm or population variance."""
    if how == "mean":
        return total / n
    if how == "l2":
        return total_sq.sqrt()
    if how == "var":
        mean = total / n
        return (total_sq / n - mean * mean).clamp_min(0.0)
    raise ValueError(f"unknown sample aggregation {how!r}")


def width_scores(stats: Stats, model: ModelConfig, sample_aggregation: str) -> Dict[str, torch.Tensor]:
    """Neuron, head, query-group and channel scores from the globally reduced statistics."""
    n = float(stats["samples"])
    if n <= 0:
        raise ValueError("no calibration samples were seen")
    agg = lambda name: finalize(stats[f"{name}_sum"], stats[f"{name}_sumsq"], n,  # noqa: E731
                                sample_aggregation)
    heads = agg("head")
    per_norm = agg("norm")
    # [L, nq] -> [L, ng, nq/ng] -> [L, ng]: a group is as important as its heads together
    groups = heads.reshape(model.num_layers, model.num_query_groups, -1).sum(dim=-1)
    return {
        "mlp.neurons": agg("neuron"),
        "attention.heads": heads,
        "attention.query_groups": groups,
        "embedding.channels_per_norm": per_norm,
        "embedding.channels": per_norm.sum(dim=0),
    }


def cosine_scores(stats: Stats) -> torch.Tensor:
    """Per layer 1 - mean cosine(input hidden, output hidden) over all calibration tokens."""
    return (1.0 - stats["cos_sum"] / stats["cos_tokens"].clamp_min(1.0)).float()
