"""The GPT output layer seen from outside: its weight, and a mode in which GPTModel.forward
returns the final hidden states instead of logits (for losses fused with the output GEMM,
distill/fused_output.py), with exactly what megatron's ColumnParallelLinear does to its input
first, so gradients flow as they would through the layer."""

from contextlib import ExitStack, contextmanager
from typing import Iterator, Optional

import torch


def final_logit_cap(gpt) -> Optional[float]:
    """Gemma 2's soft-cap of the output logits (a hook on the output layer, models/gemma.py);
    None for other models. A loss fused with the output GEMM would skip it, so the callers of
    hidden_states_out run the output layer instead for a capped model."""
    return getattr(gpt, "final_logit_softcapping", None)


def output_weight(gpt) -> torch.Tensor:
    """The output layer's vocabulary shard `[v/tp, h]`: the word embeddings when tied."""
    if gpt.share_embeddings_and_output_weights:
        return gpt.shared_embedding_or_output_weight()
    return gpt.output_layer.weight


class _BatchFirstLayout(torch.autograd.Function):
    """Identity on `[s, b, h]` whose result is laid out batch-first in memory, and whose
    gradient is made contiguous (sequence-first) again in backward.

    GPTModel ends with `output.transpose(0, 1).contiguous()` ([s, b] -> [b, s]). Fed a
    sequence-first tensor, that copies in forward, and in backward hands on the transposed
    view of the loss's `[b, s, h]` gradient: a strided tensor that every element-wise op of
    the block's backward keeps strided (the residual adds, the norms), so that each linear
    layer's backward copies its gradient twice to make it contiguous (the dgrad matmul, then
    megatron's wgrad preparation), and under TP megatron's _CopyToModelParallelRegion
    all-reduces a contiguous copy whose reduced values would be dropped. Here the one copy is
    made in forward (GPTModel's transpose is then contiguous, its .contiguous() free) and one
    in backward, at the boundary: the blocks see the layout they made."""

    @staticmethod
    def forward(ctx, x):
        return x.transpose(0, 1).contiguous().transpose(0, 1)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


def _layer_input(layer, hidden: torch.Tensor) -> torch.Tensor:
    """What ColumnParallelLinear's GEMM reads: under sequence parallelism the sequence shards
    all-gathered (reduce-scattered in backward); under TP the identity whose backward
    all-reduces the input gradient over the TP group. Laid out batch-first (_BatchFirstLayout)."""
    from megatron.core.tensor_parallel.mappings import (copy_to_tensor_model_parallel_region,
                                                        gather_from_sequence_parallel_region)

    if layer.sequence_parallel:
        hidden = gather_from_sequence_parallel_region(hidden, group=layer.tp_group)
    elif layer.tp_group is not None and layer.tp_group.size() > 1:
        hidden = copy_to_tensor_model_parallel_region(hidden, group=layer.tp_group)
    return _BatchFirstLayout.apply(hidden)


@contextmanager
def hidden_states_out(*gpts) -> Iterator[None]:
    """Within the block, each GPTModel's forward (labels=None) returns its final hidden
    states `[b, s, h]` (after the final norm, through the layer's input region) in place of
    logits `[b, s, v/tp]`: the output GEMM is skipped, its weight stays where it is."""
    def passthrough(layer):
        def forward(input_, weight=None, runtime_gather_output=None):
            return _layer_input(layer, input_), None
        return forward

    with ExitStack() as stack:
        for gpt in gpts:
            layer = gpt.output_layer
            layer.forward = passthrough(layer)  # an instance attribute shadows the method
            stack.callback(lambda lyr=layer: lyr.__dict__.pop("forward", None))
        yield
