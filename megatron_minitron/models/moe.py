"""Mixture-of-experts GPT layers: the megatron-core settings that make routing equal Hugging
Face's at inference, the local layer spec (SequentialMLP experts, no Transformer Engine), and
typed accessors for a layer's router, experts and shared expert.

Routing equals HF's (Mixtral, Qwen2-MoE) when megatron never drops or pads tokens
(moe_expert_capacity_factor None), routes top-k by softmax score (no groups, no expert bias,
no jitter, no score scaling), and uses the plain PyTorch router and permutation (no fusions).
The auxiliary load-balancing loss only adds a gradient in training (MoEAuxLossAutoScaler);
the activations are unchanged."""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional

import torch

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.parallel import ParallelConfig


def moe_transformer_kwargs(model: ModelConfig, parallel: ParallelConfig) -> Dict[str, Any]:
    """TransformerConfig fields for the MoE part of `model` (only EP for a dense model)."""
    ep = parallel.expert_model_parallel_size
    if model.num_moe_experts is None:
        if ep > 1:
            raise ConfigError("parallel.expert_model_parallel_size", f"is {ep} but the model "
                              "has no experts (model.num_moe_experts is null)",
                              "set parallel.expert_model_parallel_size=1")
        return {}
    if model.num_moe_experts % ep:
        raise ConfigError("parallel.expert_model_parallel_size", f"{ep} does not divide "
                          f"model.num_moe_experts {model.num_moe_experts}",
                          "choose an EP that divides the number of experts")
    return dict(
        num_moe_experts=model.num_moe_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_topk=model.moe_router_topk,
        moe_router_pre_softmax=model.moe_router_pre_softmax,
        moe_router_score_function="softmax",
        moe_shared_expert_intermediate_size=model.moe_shared_expert_intermediate_size,
        moe_shared_expert_gate=model.moe_shared_expert_gate,
        moe_router_load_balancing_type="aux_loss",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_expert_capacity_factor=None,  # no token is ever dropped: HF drops none
        moe_token_dispatcher_type="allgather",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=ep,
    )


def moe_layer_spec(model: ModelConfig):
    """megatron-core's local GPT layer spec with an MoE MLP (SequentialMLP experts)."""
    from megatron.core.models.gpt import gpt_layer_specs as specs

    return specs.get_gpt_layer_local_spec(num_experts=model.num_moe_experts,
                                          moe_grouped_gemm=False,
                                          normalization=model.normalization,
                                          qk_layernorm=model.qk_layernorm)


@dataclass
class MoEParts:
    """One layer's MoE MLP, by role. `experts` holds this rank's experts in order; their
    global indices start at `first_expert` (EP rank x experts per rank)."""

    router: torch.nn.Module
    """TopKRouter: weight [num_moe_experts, h] (replicated on every rank)."""
    experts: List[torch.nn.Module]
    """The local experts: megatron MLPs with linear_fc1 ([2*f/tp, h]) and linear_fc2."""
    first_expert: int
    """Global index of experts[0]."""
    shared_expert: Optional[torch.nn.Module]
    """SharedExpertMLP (linear_fc1, linear_fc2, gate_weight [1, h]) or None."""
    expert_tp_group: object
    """The process group the experts' ffn is split over (megatron's expert TP group)."""


def is_moe_layer(layer: torch.nn.Module) -> bool:
    return hasattr(layer.mlp, "router")


def moe_parts(layer: torch.nn.Module) -> MoEParts:
    """The MoE pieces of a TransformerLayer built from moe_layer_spec."""
    mlp = layer.mlp
    if not hasattr(mlp, "router"):
        raise TypeError(f"{type(mlp).__name__} is not an MoE layer")
    return MoEParts(router=mlp.router, experts=list(mlp.experts.local_experts),
                    first_expert=mlp.local_expert_indices[0],
                    shared_expert=mlp.shared_experts, expert_tp_group=mlp.experts.tp_group)
