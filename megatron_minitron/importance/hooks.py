"""Forward hooks that turn this rank's activations into width statistics (see aggregation.py).

Where each score is read, in megatron-core module names:
  MLP neurons      input of mlp.linear_fc2 (after the activation / GLU), per channel;
  attention heads  input of self_attention.linear_proj, L2 over kv_channels per head
                   (importance.head_score=projected: L2 of the head's linear_proj output);
  channels         output of input_layernorm, pre_mlp_layernorm and decoder.final_layernorm;
  experts          MoE layers' experts and shared expert: importance/experts.py.
With the Transformer-Engine spec the two per-layer norms are fused into linear_qkv / linear_fc1
(TELayerNormColumnParallelLinear, input_layernorm is an IdentityOp) and their output is never
materialised; we then hook the fused linear's input and recompute the normalised activation
from its layer_norm_weight/bias (`normalised`), so both specs give the same statistic.
Tokens whose loss_mask is 0 (padding) are left out of every statistic (aggregation.TokenMask,
set by the runner before each micro-batch's forward).
ColumnParallel shards are contiguous blocks of neurons / query groups, so TP rank r owns global
columns [r * local, (r + 1) * local).
"""

from typing import Callable, List, Optional

import torch
import torch.nn.functional as F

from megatron_minitron.config.model import ModelConfig
from megatron_minitron.importance.aggregation import (Stats, TokenMask, accumulate, head_norms,
                                                      projected_head_norms, reduce_sequence)
from megatron_minitron.models.hooks import HookSet, first_input
from megatron_minitron.models.layers import final_norms, is_fused_norm, layers


def normalised(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float,
               normalization: str, zero_centered_gamma: bool = False) -> torch.Tensor:
    """The output of a norm recomputed from its parameters (for norms fused into a linear)."""
    x, w = x.float(), weight.float()
    if zero_centered_gamma:
        w = w + 1.0
    if normalization == "RMSNorm":
        return x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + eps) * w
    b = None if bias is None else bias.float()
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def fused_norm_output(linear: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Normalised activation of a TE LayerNorm*Linear from its input."""
    return normalised(x, linear.layer_norm_weight, getattr(linear, "layer_norm_bias", None),
                      float(linear.eps), linear.normalization,
                      bool(getattr(linear, "zero_centered_gamma", False)))


class WidthHooks(HookSet):
    """Context manager: while active, forward passes add to `stats` (global-shaped, fp32),
    over the tokens that `mask` (set per micro-batch by the caller) lets count."""

    def __init__(self, chunks: List[torch.nn.Module], model: ModelConfig, stats: Stats,
                 seq_aggregation: str, tp_rank: int, tp_size: int,
                 mask: Optional[TokenMask] = None, head_score: str = "output"):
        self.chunks, self.model, self.stats = chunks, model, stats
        self.how, self.tp_rank, self.tp_size = seq_aggregation, tp_rank, tp_size
        self.head_score = head_score
        self.mask = mask or TokenMask()
        self.handles: list = []

    def _reduce(self, x: torch.Tensor) -> torch.Tensor:
        return reduce_sequence(x, self.how, self.mask.value)

    def _pre(self, module: torch.nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        hook = lambda m, args, kwargs: fn(first_input(args, kwargs))  # noqa: E731
        self.handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))

    def _post(self, module: torch.nn.Module, fn: Callable[[torch.Tensor], None]) -> None:
        hook = lambda m, args, out: fn(out[0] if isinstance(out, tuple) else out)  # noqa: E731
        self.handles.append(module.register_forward_hook(hook))

    def _norm_site(self, norm: torch.nn.Module, fused_into: torch.nn.Module, row: int) -> None:
        """Channel statistics of one norm's output; TP ranks see the same, rank 0 keeps it."""
        if self.tp_rank != 0:
            return
        add = lambda y: accumulate(self.stats, "norm", row, 0, self._reduce(y))  # noqa: E731
        if is_fused_norm(fused_into):
            self._pre(fused_into, lambda x: add(fused_norm_output(fused_into, x)))
        else:
            self._post(norm, add)

    def _neurons(self, row: int, x: torch.Tensor) -> None:
        # [s, b, f/tp] -> [b, f/tp] at global columns of this TP shard
        local = x.shape[-1]
        accumulate(self.stats, "neuron", row, self.tp_rank * local, self._reduce(x))

    def _heads(self, row: int, x: torch.Tensor, proj: torch.nn.Module) -> None:
        # [s, b, np*hn] -> [s, b, np] -> [b, np] at global head indices of this TP shard
        if self.head_score == "projected":
            per_head = projected_head_norms(x, proj.weight, self.model.kv_channels)
        else:
            per_head = head_norms(x, self.model.kv_channels)
        local = per_head.shape[-1]
        accumulate(self.stats, "head", row, self.tp_rank * local, self._reduce(per_head))

    def __enter__(self) -> "WidthHooks":
        L = self.model.num_layers
        for layer in layers(self.chunks):
            i = layer.number - 1
            proj = layer.linear_proj
            self._pre(proj, lambda x, i=i, p=proj: self._heads(i, x, p))
            self._norm_site(layer.input_layernorm, layer.linear_qkv, 2 * i)
            if not layer.is_dense:  # mixture of experts: importance/experts.py
                self._norm_site(layer.pre_mlp_layernorm, layer.pre_mlp_layernorm, 2 * i + 1)
                continue
            self._pre(layer.linear_fc2, lambda x, i=i: self._neurons(i, x))
            self._norm_site(layer.pre_mlp_layernorm, layer.linear_fc1, 2 * i + 1)
        for norm in final_norms(self.chunks):
            self._norm_site(norm, norm, 2 * L)
        return self
