"""Mixture-of-experts pruning: the num_moe_experts, moe_ffn_hidden_size and
moe_shared_expert_intermediate_size targets, which experts and neurons survive (per layer, by
the moe.* scores of importance/experts.py), and the slicing of one MoE layer's tensors.

An expert is removed with its router row, so the router's softmax and top-k run over the kept
experts only: tokens that went to a removed expert go to their next best kept one (as in
NVIDIA's expert pruning). Kept experts are renumbered in their original order.
"""

import re
from typing import Callable, Dict, List, Optional, Tuple

import torch

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.prune import MOE_AXES, PruneConfig

EXPERT_KEY = re.compile(r"mlp\.experts\.local_experts\.(\d+)\.(.+)")


def moe_target_sizes(src: ModelConfig, cfg: PruneConfig, sizes: Dict[str, int]
                     ) -> Dict[str, int]:
    """The target's moe_* sizes (src's where unset); ConfigError naming the field otherwise.
    `sizes`: the resolved dense axes (an all-MoE model has no dense MLP to shrink)."""
    asked = {a: getattr(cfg.target, a) for a in MOE_AXES if getattr(cfg.target, a) is not None}
    if src.num_moe_experts is None:
        if asked:
            raise ConfigError(f"prune.target.{next(iter(asked))}", "the model has no experts",
                              "leave the moe_* targets null for a dense model")
        return {}
    if sizes.get("ffn_hidden_size", src.ffn_hidden_size) != src.ffn_hidden_size:
        field = ("prune.target.ffn_hidden_size" if cfg.target.ffn_hidden_size is not None
                 else "prune.budget_axes")
        raise ConfigError(field, "every layer of this MoE model has experts, none a dense MLP "
                          "of ffn_hidden_size", "shrink prune.target.moe_ffn_hidden_size (and "
                          "leave ffn_hidden_size out of prune.budget_axes)")
    out = {a: asked.get(a, getattr(src, a)) for a in MOE_AXES}
    tp = cfg.tensor_model_parallel_size
    for name, v in out.items():
        full = getattr(src, name)
        if v is None or (name not in asked):
            continue
        if full is None:
            raise ConfigError(f"prune.target.{name}", "the model has no shared expert",
                              "leave it null")
        low = src.moe_router_topk if name == "num_moe_experts" else 1
        if not low <= v <= full:
            raise ConfigError(f"prune.target.{name}", f"{v} is outside {low}..{full}",
                              f"keep between {low} (" + ("moe_router_topk" if low > 1 else
                                                           "one") + f") and {full} (the source)")
        if name != "num_moe_experts" and v % tp:
            raise ConfigError(f"prune.target.{name}", f"{v} is not divisible by "
                              f"prune.tensor_model_parallel_size {tp}",
                              f"use a multiple of {tp}")
    return out


def moe_plan(src: ModelConfig, target: ModelConfig, scores,
             top: Callable[[torch.Tensor, int], torch.Tensor]
             ) -> Tuple[List[torch.Tensor], List[List[torch.Tensor]], List[torch.Tensor]]:
    """Per source layer: kept experts, the kept neurons of each kept expert, and the kept
    shared-expert neurons (sorted index tensors); empty lists for a dense model.
    top(scores, k): the plan's ranking (indices of the k best, sorted)."""
    if src.num_moe_experts is None:
        return [], [], []

    def ranking(name: str, full: Optional[int], k: Optional[int]) -> Optional[torch.Tensor]:
        if full == k:
            return None
        if scores is None:
            raise ConfigError("prune.scores", f"shrinking needs importance scores ({name})",
                              "run `minitron importance` and set prune.scores")
        return scores.get(name)

    E, f, fs = (src.num_moe_experts, src.moe_ffn_hidden_size,
                src.moe_shared_expert_intermediate_size)
    by_expert = ranking("moe.experts", E, target.num_moe_experts)
    by_neuron = ranking("moe.neurons", f, target.moe_ffn_hidden_size)
    by_shared = ranking("moe.shared_neurons", fs, target.moe_shared_expert_intermediate_size)
    experts, ffn, shared = [], [], []
    for i in range(src.num_layers):
        kept = (torch.arange(E) if by_expert is None
                else top(by_expert[i], target.num_moe_experts))
        experts.append(kept)
        ffn.append([torch.arange(f) if by_neuron is None
                    else top(by_neuron[i, e], target.moe_ffn_hidden_size) for e in kept.tolist()])
        if fs is not None:
            shared.append(torch.arange(fs) if by_shared is None
                          else top(by_shared[i], target.moe_shared_expert_intermediate_size))
    return experts, ffn, shared


def is_moe_key(rest: str) -> bool:
    """A layer tensor (name after `decoder.layers.<i>.`) of an MoE MLP."""
    return rest.startswith(("mlp.router.", "mlp.experts.", "mlp.shared_experts."))


Index = Optional[torch.Tensor]


def moe_slice(rest: str, i: int, plan, fc1_rows: Callable[..., torch.Tensor]
              ) -> Optional[Tuple[str, Index, Index]]:
    """How one MoE tensor of source layer i is sliced: (new name, kept rows, kept columns),
    None for an index kept whole, or None overall when the tensor is dropped (a removed
    expert). fc1_rows(neurons, ffn, gated): slicing's [gate; up] row rule."""
    src, hid = plan.source, plan.hidden
    gated = src.gated_linear_unit
    if rest == "mlp.router.weight":  # [E, h] -> [E', h']
        return rest, plan.experts[i], hid
    m = EXPERT_KEY.fullmatch(rest)
    if m is not None:
        kept = plan.experts[i].tolist()
        e = int(m.group(1))
        if e not in kept:
            return None
        new, neurons = kept.index(e), plan.moe_ffn[i][kept.index(e)]
        name = f"mlp.experts.local_experts.{new}.{m.group(2)}"
        if name.endswith("_extra_state"):
            return name, None, None
        if m.group(2) == "linear_fc1.weight":  # [2f, h] -> [2f', h']
            return name, fc1_rows(neurons, src.moe_ffn_hidden_size, gated), hid
        if m.group(2) == "linear_fc2.weight":  # [h, f] -> [h', f']
            return name, hid, neurons
    if rest.endswith("_extra_state"):
        return rest, None, None
    if rest == "mlp.shared_experts.linear_fc1.weight":
        fs = src.moe_shared_expert_intermediate_size
        return rest, fc1_rows(plan.shared_ffn[i], fs, gated), hid
    if rest == "mlp.shared_experts.linear_fc2.weight":
        return rest, hid, plan.shared_ffn[i]
    if rest == "mlp.shared_experts.gate_weight":  # [1, h] -> [1, h']
        return rest, None, hid
    raise ValueError(f"no slicing rule for MoE tensor {rest!r}")
