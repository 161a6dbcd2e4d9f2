"""Typed access to a GPTModel's layers: the one place that knows how megatron-core lays them
out, so importance, pruning and distillation ask here instead of indexing modules."""

from typing import List

import torch

from megatron_minitron.models.builder import unwrap


def transformer_layers(chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
    """This rank's TransformerLayers over all model chunks (layer_number is global, 1-based)."""
    return [layer for c in chunks for layer in unwrap(c).decoder.layers]


def final_norms(chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
    norms = [getattr(unwrap(c).decoder, "final_layernorm", None) for c in chunks]
    return [n for n in norms if n is not None]


def is_fused_norm(linear: torch.nn.Module) -> bool:
    """A Transformer-Engine LayerNorm*Linear: the norm in front of it lives inside it."""
    return hasattr(linear, "layer_norm_weight")
