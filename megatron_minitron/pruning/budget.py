"""Parameter budget -> target sizes: shrink the free axes by one common ratio.

For a ratio r every free axis takes the largest valid size <= r x its source size (validity as
in plan.axis_problem, in AXES order so heads see their groups); we scan r downwards and take
the first candidate whose exact megatron-core parameter count (ModelConfig.num_parameters)
fits. The scan, not a bisection, because snapping to valid sizes makes the count step-wise.
"""

import dataclasses
from typing import Callable, Dict, List, Optional

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.prune import AXES, PruneConfig

STEPS = 2000
"""Ratios tried between 1 and 0."""

Problem = Callable[[str, int, Dict[str, int], ModelConfig, PruneConfig], Optional[str]]


def largest_valid(name: str, upper: int, sizes: Dict[str, int], src: ModelConfig,
                  cfg: PruneConfig, problem: Problem) -> Optional[int]:
    for v in range(min(upper, getattr(src, name)), 0, -1):
        if problem(name, v, sizes, src, cfg) is None:
            return v
    return None


def candidate(ratio: float, src: ModelConfig, fixed: Dict[str, Optional[int]], free: List[str],
              cfg: PruneConfig, problem: Problem) -> Optional[Dict[str, int]]:
    """Sizes of every axis at this ratio, or None when some free axis has no valid size."""
    sizes: Dict[str, int] = {}
    for name in AXES:
        if name in free:
            v = largest_valid(name, max(1, int(ratio * getattr(src, name))), sizes, src, cfg,
                              problem)
            if v is None:
                return None
            sizes[name] = v
        else:
            sizes[name] = fixed[name] if fixed[name] is not None else getattr(src, name)
    return sizes


def count(src: ModelConfig, sizes: Dict[str, int], include_embeddings: bool) -> int:
    model = dataclasses.replace(src, kv_channels=src.kv_channels, **sizes)
    return model.num_parameters(include_embeddings=include_embeddings)


def resolve_budget(src: ModelConfig, fixed: Dict[str, Optional[int]], free: List[str],
                   cfg: PruneConfig, problem: Problem) -> Dict[str, int]:
    """Sizes for the free axes meeting cfg.param_budget as closely as possible from below."""
    if not free:
        raise ConfigError("prune.budget_axes", "every budget axis is already set in "
                          "prune.target", "leave at least one budget axis null in the target")
    budget, emb = cfg.param_budget, cfg.budget_include_embeddings
    smallest = None
    for step in range(STEPS, 0, -1):
        sizes = candidate(step / STEPS, src, fixed, free, cfg, problem)
        if sizes is None:
            continue
        n = count(src, sizes, emb)
        smallest = n if smallest is None else min(smallest, n)
        if n <= budget:
            return {a: sizes[a] for a in free}
    raise ConfigError("prune.param_budget", f"{budget} parameters is below the smallest "
                      f"reachable {smallest} by shrinking {free}",
                      "raise the budget or add axes to prune.budget_axes")
