"""Typed access to a GPTModel's parts: the one place that knows how megatron-core lays a model
out (module attributes and state-dict keys), so importance, pruning and distillation ask here
instead of indexing `decoder.layers[i].self_attention...` themselves. A new layer kind
(qk-norm, fused projections, experts) is then taught here once.

Module names are megatron-core's (local and Transformer-Engine specs alike): per layer
self_attention.{linear_qkv, core_attention, linear_proj}, mlp.{linear_fc1, linear_fc2},
input_layernorm and pre_mlp_layernorm (IdentityOps when TE fuses them into linear_qkv /
linear_fc1); per model embedding.word_embeddings, decoder.final_layernorm, output_layer."""

import re
from typing import List, Optional

import torch

from megatron_minitron.models.builder import unwrap

LAYER_KEY = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
"""A TransformerLayer's state-dict key: group 1 the 0-based local index, group 2 the rest."""
QKV = "self_attention.linear_qkv."
PROJ_WEIGHT = "self_attention.linear_proj.weight"
FC1 = "mlp.linear_fc1."
FC2_WEIGHT = "mlp.linear_fc2.weight"
HIDDEN_VECTORS = ("input_layernorm.weight", "input_layernorm.bias", "pre_mlp_layernorm.weight",
                  "pre_mlp_layernorm.bias", "self_attention.linear_qkv.layer_norm_weight",
                  "self_attention.linear_qkv.layer_norm_bias", "mlp.linear_fc1.layer_norm_weight",
                  "mlp.linear_fc1.layer_norm_bias", "self_attention.linear_proj.bias",
                  "mlp.linear_fc2.bias", "post_self_attn_layernorm.weight",
                  "post_mlp_layernorm.weight")
"""A layer's tensors of shape [h]: they follow the kept hidden channels."""
HEAD_DIM_VECTORS = ("self_attention.q_layernorm.weight", "self_attention.q_layernorm.bias",
                    "self_attention.k_layernorm.weight", "self_attention.k_layernorm.bias")
"""q/k norms (qk_layernorm): one [kv_channels] weight shared by every head and group."""
FINAL_NORM_KEYS = ("decoder.final_layernorm.weight", "decoder.final_layernorm.bias")
HIDDEN_COLUMN_KEYS = ("embedding.word_embeddings.weight", "embedding.position_embeddings.weight",
                      "output_layer.weight")
"""Model tensors [rows, h]: their columns follow the kept hidden channels."""


def layer_key(index: int, rest: str) -> str:
    """The state-dict key of `rest` in the layer at 0-based local index `index`."""
    return f"decoder.layers.{index}.{rest}"


class Layer:
    """One TransformerLayer, seen through megatron-core's names."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    @property
    def number(self) -> int:
        """Global 1-based layer number."""
        return self.module.layer_number

    @property
    def linear_qkv(self) -> torch.nn.Module:
        return self.module.self_attention.linear_qkv

    @property
    def linear_proj(self) -> torch.nn.Module:
        return self.module.self_attention.linear_proj

    @property
    def core_attention(self) -> torch.nn.Module:
        return self.module.self_attention.core_attention

    @property
    def is_dense(self) -> bool:
        """A dense MLP (linear_fc1, linear_fc2), not mixture-of-experts."""
        return hasattr(self.module.mlp, "linear_fc2")

    @property
    def linear_fc1(self) -> torch.nn.Module:
        return self.module.mlp.linear_fc1

    @property
    def linear_fc2(self) -> torch.nn.Module:
        return self.module.mlp.linear_fc2

    @property
    def input_layernorm(self) -> torch.nn.Module:
        return self.module.input_layernorm

    @property
    def pre_mlp_layernorm(self) -> torch.nn.Module:
        return self.module.pre_mlp_layernorm


def decoder_layers(gpt: torch.nn.Module) -> List[torch.nn.Module]:
    """One chunk's TransformerLayers (wrappers allowed)."""
    return list(unwrap(gpt).decoder.layers)


def transformer_layers(chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
    """This rank's TransformerLayers over all model chunks (layer_number is global, 1-based)."""
    return [layer for c in chunks for layer in decoder_layers(c)]


def layers(chunks: List[torch.nn.Module]) -> List[Layer]:
    """This rank's layers over all model chunks, typed."""
    return [Layer(m) for m in transformer_layers(chunks)]


def layer_numbers(gpt: torch.nn.Module) -> List[int]:
    """Global 1-based numbers of one chunk's layers."""
    return [m.layer_number for m in decoder_layers(gpt)]


def final_norm(gpt: torch.nn.Module) -> Optional[torch.nn.Module]:
    """The decoder's final norm (None on chunks that hold none)."""
    return getattr(unwrap(gpt).decoder, "final_layernorm", None)


def final_norms(chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
    norms = [final_norm(c) for c in chunks]
    return [n for n in norms if n is not None]


def word_embeddings(gpt: torch.nn.Module) -> torch.nn.Module:
    """The vocabulary-parallel embedding table (first stage only)."""
    return unwrap(gpt).embedding.word_embeddings


def embedding(gpt: torch.nn.Module) -> torch.nn.Module:
    """The embedding module, whose output is the input of layer 1 (first stage only)."""
    return unwrap(gpt).embedding


def decoder_input(gpt: torch.nn.Module) -> torch.Tensor:
    """The tensor the pipeline schedule handed this (non-first) stage."""
    return unwrap(gpt).decoder.input_tensor


def output_layer(gpt: torch.nn.Module) -> torch.nn.Module:
    """The vocabulary-parallel output ColumnParallelLinear (last stage only)."""
    return unwrap(gpt).output_layer


def is_fused_norm(linear: torch.nn.Module) -> bool:
    """A Transformer-Engine LayerNorm*Linear: the norm in front of it lives inside it."""
    return hasattr(linear, "layer_norm_weight")

