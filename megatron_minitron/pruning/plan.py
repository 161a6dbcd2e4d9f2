"""Prune plans: the target architecture, checked before any work, and which indices survive.

Targets are checked axis by axis in dependency order (groups, heads, hidden, ffn, layers); a
bad value raises ConfigError naming the field and the nearest valid values. Rankings keep the
highest scores; ties keep the lower index (stable sort), and every kept index list is sorted so
surviving channels keep their original order.
"""

import dataclasses
import warnings
from typing import Dict, List, Optional

import torch

from megatron_minitron.checkpoint.hf_keymap import hf_export_problem
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.prune import AXES, PruneConfig
from megatron_minitron.importance.scores import Scores
from megatron_minitron.pruning.budget import resolve_budget
from megatron_minitron.pruning.depth import select_layers
from megatron_minitron.pruning.experts import moe_plan, moe_target_sizes



@dataclasses.dataclass
class PrunePlan:
    """What survives. Per-layer lists are indexed by source layer (layer_number - 1)."""

    source: ModelConfig
    target: ModelConfig
    hidden: torch.Tensor
    """Kept embedding channels, sorted. # [h']"""
    ffn: List[torch.Tensor]
    """Kept MLP neurons of each source layer, sorted. # [f'] each"""
    groups: List[torch.Tensor]
    """Kept query groups of each source layer, sorted. # [ng'] each"""
    heads: List[torch.Tensor]
    """Kept query heads (global indices) of each source layer, grouped by kept group, sorted.
    # [nq'] each"""
    layers: List[int]
    """Kept source layer numbers (1-based, sorted); new layer i is source layers[i]."""
    experts: List[torch.Tensor] = dataclasses.field(default_factory=list)
    """MoE: kept routed experts of each source layer, sorted. # [E'] each"""
    moe_ffn: List[List[torch.Tensor]] = dataclasses.field(default_factory=list)
    """MoE: kept neurons of each kept expert of each source layer. # [f'] each"""
    shared_ffn: List[torch.Tensor] = dataclasses.field(default_factory=list)
    """MoE: kept shared-expert neurons of each source layer. # [fs'] each"""


def axis_problem(name: str, v: int, sizes: Dict[str, int], src: ModelConfig,
                 cfg: PruneConfig) -> Optional[str]:
    """Why size v is invalid for axis `name`, given the axes before it in AXES; or None."""
    tp, pp = cfg.tensor_model_parallel_size, cfg.pipeline_model_parallel_size
    if v < 1 or v > getattr(src, name):
        return f"{v} is outside 1..{getattr(src, name)} (the source's size)"
    if name == "num_query_groups" and v % tp:
        return f"{v} is not divisible by tensor_model_parallel_size {tp}"
    if name == "num_attention_heads":
        ng = sizes["num_query_groups"]
        if v % ng or v // ng > src.heads_per_group:
            return (f"{v} heads cannot be spread over {ng} query groups of at most "
                    f"{src.heads_per_group} heads")
    if name == "hidden_size":
        if v % cfg.hidden_size_divisor:
            return f"{v} is not a multiple of hidden_size_divisor {cfg.hidden_size_divisor}"
        if cfg.require_hf_export and hf_export_problem(src) is None:
            problem = hf_export_problem(dataclasses.replace(src, hidden_size=v, **{
                a: sizes[a] for a in ("num_query_groups", "num_attention_heads")}))
            if problem is not None:
                return f"{v} cannot be exported to Hugging Face: {problem}"
    if name == "ffn_hidden_size":
        for d, what in ((tp, "tensor_model_parallel_size"), (cfg.ffn_hidden_size_divisor,
                                                             "ffn_hidden_size_divisor")):
            if v % d:
                return f"{v} is not divisible by {what} {d}"
    if name == "num_layers" and v % pp:
        return f"{v} is not divisible by pipeline_model_parallel_size {pp}"
    return None


def nearest_valid(name: str, v: int, sizes: Dict[str, int], src: ModelConfig,
                  cfg: PruneConfig) -> List[int]:
    """The closest valid sizes below and above v (one or two values; empty if none)."""
    ok = lambda u: axis_problem(name, u, sizes, src, cfg) is None  # noqa: E731
    below = next((u for u in range(min(v, getattr(src, name)), 0, -1) if ok(u)), None)
    above = next((u for u in range(max(v, 1), getattr(src, name) + 1) if ok(u)), None)
    return sorted({u for u in (below, above) if u is not None})


def check_axis(name: str, sizes: Dict[str, int], src: ModelConfig, cfg: PruneConfig) -> None:
    problem = axis_problem(name, sizes[name], sizes, src, cfg)
    if problem is not None:
        near = nearest_valid(name, sizes[name], sizes, src, cfg)
        raise ConfigError(f"prune.target.{name}", problem,
                          f"use one of the nearest valid values {near}" if near else
                          "no size of this axis fits; relax the other targets or the TP size")


def resolve_target(src: ModelConfig, cfg: PruneConfig) -> ModelConfig:
    """The target ModelConfig (kv_channels kept); raises ConfigError before any work."""
    sizes: Dict[str, Optional[int]] = {a: getattr(cfg.target, a) for a in AXES}
    nq, ng = sizes["num_attention_heads"], sizes["num_query_groups"]
    if ng is None and nq is not None:
        if cfg.head_mode == "groups" or src.heads_per_group == 1:
            if nq % src.heads_per_group:
                raise ConfigError("prune.target.num_attention_heads", f"{nq} is not a multiple "
                                  f"of heads_per_group {src.heads_per_group} (head_mode=groups)",
                                  "use a multiple of it or head_mode=heads")
            sizes["num_query_groups"] = nq // src.heads_per_group
        else:
            sizes["num_query_groups"] = src.num_query_groups
    if ng is not None and nq is None:
        sizes["num_attention_heads"] = ng * src.heads_per_group
    if cfg.depth_mode == "list":
        drop = src.num_layers - len(set(cfg.drop_layers))
        if sizes["num_layers"] not in (None, drop):
            raise ConfigError("prune.target.num_layers", f"{sizes['num_layers']} layers but "
                              f"drop_layers leaves {drop}", f"set it to {drop} or null")
        sizes["num_layers"] = drop
    if cfg.param_budget is not None:
        free = [a for a in cfg.budget_axes if sizes[a] is None]
        sizes.update(resolve_budget(src, sizes, free, cfg, axis_problem))
    for name in AXES:
        if sizes[name] is None:
            sizes[name] = getattr(src, name)
        check_axis(name, sizes, src, cfg)
    kinds = {} if src.layer_types is None or sizes["num_layers"] == src.num_layers else {
        "layer_types": None}  # which layers stay is make_plan's choice; it sets their kinds
    target = dataclasses.replace(src, kv_channels=src.kv_channels, **sizes, **kinds,
                                 **moe_target_sizes(src, cfg, sizes))
    problem = hf_export_problem(target)  # transformers 5.x refuses e.g. hidden % heads != 0
    if problem is not None:
        if cfg.require_hf_export:
            raise ConfigError("prune.target", f"Hugging Face cannot load the target: {problem}",
                              "change the target or set prune.require_hf_export=false")
        warnings.warn(f"the pruned model will not export to Hugging Face: {problem}")
    return target


def top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k highest scores, sorted ascending; ties keep the lower index."""
    order = torch.argsort(-scores.double(), stable=True)
    return order[:k].sort().values


def make_plan(src: ModelConfig, target: ModelConfig, scores: Optional[Scores],
              cfg: PruneConfig) -> PrunePlan:
    """Rank with `scores` on every axis that shrinks (an unchanged axis needs no scores)."""
    if scores is not None:
        scores.check_model(src)

    def ranked(name: str, full: int, k: int) -> torch.Tensor:
        if k == full:
            return torch.arange(full)
        if scores is None:
            raise ConfigError("prune.scores", f"shrinking needs importance scores ({name})",
                              "run `minitron importance` and set prune.scores")
        return scores.get(name)

    L, hpg, hpg_new = src.num_layers, src.heads_per_group, target.heads_per_group
    h_scores = ranked("embedding.channels", src.hidden_size, target.hidden_size)
    hidden = top(h_scores, target.hidden_size)
    ffn, groups, heads = [], [], []
    for i in range(L):
        f = ranked("mlp.neurons", src.ffn_hidden_size, target.ffn_hidden_size)
        ffn.append(top(f if f.dim() == 1 else f[i], target.ffn_hidden_size))
        g = ranked("attention.query_groups", src.num_query_groups, target.num_query_groups)
        kept_groups = top(g if g.dim() == 1 else g[i], target.num_query_groups)
        groups.append(kept_groups)
        hs = ranked("attention.heads", src.num_attention_heads, target.num_attention_heads)
        hs = torch.zeros(src.num_attention_heads) if hs.dim() == 1 else hs[i]
        # [nq] -> [ng, hpg]: the best hpg' heads inside each kept group
        per_group = hs.reshape(src.num_query_groups, hpg)
        heads.append(torch.cat([g_ * hpg + top(per_group[g_], hpg_new) for g_ in
                                kept_groups.tolist()]))
    layers = select_layers(src, target.num_layers, scores, cfg)
    if src.layer_types is not None:  # the kept layers keep their sliding / full attention
        target = dataclasses.replace(target, layer_types=[src.layer_types[n - 1]
                                                          for n in layers])
    return PrunePlan(src, target, hidden, ffn, groups, heads, layers,
                     *moe_plan(src, target, scores, top))
