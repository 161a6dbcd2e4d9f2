"""Mixture-of-experts importance: per-expert scores and expert / shared-expert neuron scores,
as global-shaped sums that aggregation's one all-reduce over TP, PP and DP assembles.

What is read, in megatron-core module names (models/moe.py gives the parts):
  expert tokens     router output routing_map [T, E]: tokens routed to each expert (TP rank 0
                    counts this rank's own tokens; padding tokens left out);
  expert score      output of each local expert's linear_fc2: megatron scales the expert's
                    activation by the token's router probability before linear_fc2, so that
                    output is the router-weighted expert output p * E(x); its L2 norm per
                    token, summed over the tokens routed to the expert;
  expert neurons    input of each expert's linear_fc2 (p * act(x)), |.| summed per channel;
  shared neurons    input of shared_experts.linear_fc2, like the dense MLP neurons.
Layout facts the sums rely on:
  * EP: an expert lives on one EP rank, which sees (allgather dispatcher) the tokens of every
    rank of its TP x EP group; EP ranks are data-parallel ranks, so the DP sum assembles experts
    from their owners with zeros elsewhere.
  * TP (no sequence parallelism): the dispatcher gathers every TP rank's identical copy of the
    tokens, so each expert sees each token tp_size times; sums are divided by tp_size. Expert
    linear_fc2 outputs are partial sums over the TP shards of f (megatron reduces them later,
    in the combine), so the per-token norm needs the TP sum first: one all-reduce over the
    expert TP group inside the hook (every TP rank runs the same experts in the same order),
    after which TP rank 0 keeps the norms.
Scores (scores file names):
  moe.experts        [L, E]     sum over tokens of ||p * E(x)|| / calibration tokens
  moe.expert_tokens  [L, E]     tokens routed to each expert
  moe.neurons        [L, E, f]  sum over routed tokens of |p * act_j(x)| / calibration tokens
  moe.shared_neurons [L, fs]    per-sample aggregated like mlp.neurons
Dense layers of the same model keep their rows of zeros in these tensors.
"""

from typing import Dict, List, Optional

import torch

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.importance.aggregation import (Stats, TokenMask, accumulate, finalize,
                                                      reduce_sequence)
from megatron_minitron.models.hooks import HookSet, first_input
from megatron_minitron.models.layers import transformer_layers
from megatron_minitron.models.moe import is_moe_layer, moe_parts
from megatron_minitron.runtime.collectives import all_reduce_sum_


def new_expert_stats(model: ModelConfig, device: Optional[torch.device] = None) -> Stats:
    """Zeroed MoE statistics (empty for a dense model)."""
    if model.num_moe_experts is None:
        return {}
    L, E, f = model.num_layers, model.num_moe_experts, model.moe_ffn_hidden_size
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
    stats = {"moe_tokens": z(L, E), "moe_output": z(L, E), "moe_neuron": z(L, E, f),
             "moe_calib_tokens": z(L)}
    fs = model.moe_shared_expert_intermediate_size
    if fs is not None:
        stats.update(shared_neuron_sum=z(L, fs).float(), shared_neuron_sumsq=z(L, fs).float())
    return stats


class ExpertHooks(HookSet):
    """Context manager: while active, forward passes add the MoE statistics to `stats`."""

    def __init__(self, chunks: List[torch.nn.Module], stats: Stats, seq_aggregation: str,
                 tp_rank: int, tp_size: int, mask: Optional[TokenMask] = None):
        self.chunks, self.stats, self.how = chunks, stats, seq_aggregation
        self.tp_rank, self.tp_size = tp_rank, tp_size
        self.mask = mask or TokenMask()
        self.handles: list = []

    def _check_unpadded(self) -> None:
        if self.mask.value is not None:
            raise ConfigError("importance.data", "expert scores need unpadded calibration "
                              "batches (a padded token's expert output cannot be told apart "
                              "after the dispatcher's permutation)",
                              "calibrate on packed sequences without padding")

    def _routed(self, i: int, out) -> None:
        # routing_map [T, E] (T = s*b of this rank); TP ranks hold the same tokens
        self._check_unpadded()
        if self.tp_rank != 0:
            return
        routing_map = out[1]
        self.stats["moe_tokens"][i] += routing_map.sum(dim=0).double()
        self.stats["moe_calib_tokens"][i] += routing_map.shape[0]

    def _expert_output(self, i: int, e: int, y: torch.Tensor, group) -> None:
        # [n, h] partial over the expert TP shards -> full p*E(x) rows -> sum of row norms
        y = y.float()
        if self.tp_size > 1:
            y = all_reduce_sum_(y.clone(), group)
        if self.tp_rank != 0:  # every TP rank now holds the same rows
            return
        self.stats["moe_output"][i, e] += y.norm(dim=-1).sum().double() / self.tp_size

    def _expert_neurons(self, i: int, e: int, a: torch.Tensor) -> None:
        # [n, f/tp] at global columns of this TP shard
        local = a.shape[-1]
        cols = slice(self.tp_rank * local, (self.tp_rank + 1) * local)
        self.stats["moe_neuron"][i, e, cols] += a.float().abs().sum(dim=0).double() / self.tp_size

    def _shared_neurons(self, i: int, a: torch.Tensor) -> None:
        # [s, b, fs/tp] -> [b, fs/tp] at global columns of this TP shard
        local = a.shape[-1]
        accumulate(self.stats, "shared_neuron", i, self.tp_rank * local,
                   reduce_sequence(a, self.how, self.mask.value))

    def __enter__(self) -> "ExpertHooks":
        for layer in transformer_layers(self.chunks):
            if not is_moe_layer(layer):
                continue
            i, parts = layer.layer_number - 1, moe_parts(layer)
            self.handles.append(parts.router.register_forward_hook(
                lambda m, args, out, i=i: self._routed(i, out)))
            for j, expert in enumerate(parts.experts):
                e, fc2 = parts.first_expert + j, expert.linear_fc2
                self.handles.append(fc2.register_forward_hook(
                    lambda m, args, out, i=i, e=e, g=parts.expert_tp_group:
                    self._expert_output(i, e, out[0], g)))
                self.handles.append(fc2.register_forward_pre_hook(
                    lambda m, args, kwargs, i=i, e=e: self._expert_neurons(
                        i, e, first_input(args, kwargs)), with_kwargs=True))
            if parts.shared_expert is not None:
                self.handles.append(parts.shared_expert.linear_fc2.register_forward_pre_hook(
                    lambda m, args, kwargs, i=i: self._shared_neurons(
                        i, first_input(args, kwargs)), with_kwargs=True))
        return self


def check_source(model: ModelConfig, source: str) -> None:
    """The magnitude baseline reads dense MLP weights only: refuse it for an MoE model."""
    if model.num_moe_experts is not None and source == "magnitude":
        raise ConfigError("importance.source", "the magnitude baseline has no expert scores",
                          "use importance.source=activation (or random) for an MoE model")


def expert_scores(stats: Stats, sample_aggregation: str) -> Dict[str, torch.Tensor]:
    """The moe.* scores from the globally reduced statistics (none for a dense model)."""
    if "moe_tokens" not in stats:
        return {}
    calib = stats["moe_calib_tokens"].clamp_min(1.0)  # [L]
    out = {"moe.experts": (stats["moe_output"] / calib[:, None]).float(),
           "moe.expert_tokens": stats["moe_tokens"].float(),
           "moe.neurons": (stats["moe_neuron"] / calib[:, None, None]).float()}
    if "shared_neuron_sum" in stats:
        out["moe.shared_neurons"] = finalize(stats["shared_neuron_sum"],
                                             stats["shared_neuron_sumsq"],
                                             float(stats["samples"]), sample_aggregation)
    return out
