"""Architecture search, the math half: which candidate architectures meet a parameter budget.

Every axis gets a grid of sizes (search.<axis>: fractions of the source and a step); the grid is
walked in AXES order so each size is checked by plan.axis_problem against the axes before it
(TP divisibility, divisors, heads per group, Hugging Face export), and every full combination is
counted by budget.count, the same exact count that prune.param_budget uses. Those within the
tolerance band are kept; max_candidates of them are chosen closest-to-budget first, taken in
turn from depth-only, width-only and mixed shapes so the short list is not twenty near-copies.
"""

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Dict, Iterable, List

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.prune import AXES, PruneConfig, PruneTarget
from megatron_minitron.config.search import AxisRange, ExtraCandidate, SearchConfig
from megatron_minitron.pruning.budget import count
from megatron_minitron.pruning.limits import limit_problem
from megatron_minitron.pruning.plan import axis_problem, resolve_target

KINDS = ("depth", "width", "mixed")


@dataclass
class Candidate:
    """One architecture to try: every axis's size, its exact parameter count, and how layers
    are chosen when it drops some."""

    name: str
    sizes: Dict[str, int]
    params: int
    kind: str
    """"depth" (only num_layers shrinks), "width" (num_layers kept), "mixed", or "extra"."""
    depth_mode: str
    drop_layers: List[int] = field(default_factory=list)

    @property
    def target(self) -> PruneTarget:
        return PruneTarget(**self.sizes)

    def prune_config(self, base: PruneConfig) -> PruneConfig:
        """`base` (divisors, TP, head_mode, depth_metric...) aimed at exactly this candidate."""
        return dataclasses.replace(base, target=self.target, param_budget=None,
                                   depth_mode=self.depth_mode, drop_layers=list(self.drop_layers))

    def changed(self, src: ModelConfig) -> tuple:
        return tuple(a for a in AXES if self.sizes[a] != getattr(src, a))


def candidate_name(sizes: Dict[str, int]) -> str:
    return (f"L{sizes['num_layers']}_h{sizes['hidden_size']}_f{sizes['ffn_hidden_size']}"
            f"_a{sizes['num_attention_heads']}_g{sizes['num_query_groups']}")


def axis_values(name: str, src: ModelConfig, rng: AxisRange, free: bool) -> List[int]:
    """Grid of one axis, largest first; only the source's size when the axis is not free."""
    full = getattr(src, name)
    if not free:
        return [full]
    step = rng.step or max(1, full // 16)
    lo, hi = math.ceil(rng.min_fraction * full), math.floor(rng.max_fraction * full)
    grid = set(range(step, full + 1, step)) | {full}
    return sorted((v for v in grid if lo <= v <= hi), reverse=True)


def kind_of(sizes: Dict[str, int], src: ModelConfig) -> str:
    changed = [a for a in AXES if sizes[a] != getattr(src, a)]
    if changed == ["num_layers"]:
        return "depth"
    return "mixed" if "num_layers" in changed else "width"


def all_candidates(src: ModelConfig, budget: int, search: SearchConfig, prune: PruneConfig
                   ) -> List[Candidate]:
    """Every valid grid point within budget x (1 +- tolerance) and under the active-parameter
    and memory ceilings (pruning/limits.py), in grid order."""
    grids = {a: axis_values(a, src, getattr(search, a), a in search.axes) for a in AXES}
    lo, hi = budget * (1 - search.tolerance), budget * (1 + search.tolerance)
    found: List[Candidate] = []

    def walk(i: int, sizes: Dict[str, int]) -> None:
        if i == len(AXES):
            n = count(src, sizes, prune.budget_include_embeddings)
            if lo <= n <= hi and limit_problem(src, sizes, search,
                                               prune.budget_include_embeddings) is None:
                found.append(Candidate(candidate_name(sizes), dict(sizes), n,
                                       kind_of(sizes, src), search.depth_mode))
            return
        name = AXES[i]
        for v in grids[name]:
            sizes[name] = v
            if axis_problem(name, v, sizes, src, prune) is None:
                walk(i + 1, sizes)
        sizes.pop(name, None)

    walk(0, {})
    return found


def interleave(groups: Iterable[List[Candidate]]) -> List[Candidate]:
    """Round robin: the first of every group, then the second of every group, ..."""
    groups = [g for g in groups if g]
    out = []
    for i in range(max((len(g) for g in groups), default=0)):
        out += [g[i] for g in groups if i < len(g)]
    return out


def spread(cands: List[Candidate], src: ModelConfig, budget: int, k: int) -> List[Candidate]:
    """At most k candidates, closest to the budget first, alternating kinds and, inside a kind,
    the set of axes that shrink."""
    def closeness(c: Candidate):
        return (abs(c.params - budget), c.name)

    per_kind = []
    for kind in KINDS:
        families: Dict[tuple, List[Candidate]] = {}
        for c in sorted((c for c in cands if c.kind == kind), key=closeness):
            families.setdefault(c.changed(src), []).append(c)
        per_kind.append(interleave(sorted(families.values(), key=lambda f: closeness(f[0]))))
    return interleave(per_kind)[:k]


def extra_candidate(src: ModelConfig, extra: ExtraCandidate, prune: PruneConfig) -> Candidate:
    """A hand-written candidate, checked like a prune target."""
    cfg = dataclasses.replace(prune, target=extra.target, param_budget=None,
                              depth_mode=extra.depth_mode, drop_layers=list(extra.drop_layers))
    target = resolve_target(src, cfg)
    sizes = {a: getattr(target, a) for a in AXES}
    name = extra.name or candidate_name(sizes) + (
        "_drop" + "-".join(map(str, extra.drop_layers)) if extra.depth_mode == "list" else "")
    return Candidate(name, sizes, count(src, sizes, prune.budget_include_embeddings), "extra",
                     extra.depth_mode, list(extra.drop_layers))


def search_candidates(src: ModelConfig, budget: int, search: SearchConfig, prune: PruneConfig
                      ) -> List[Candidate]:
    """The candidates to train: the spread of enumerated ones, then search.extra_candidates."""
    chosen = spread(all_candidates(src, budget, search, prune), src, budget,
                    search.max_candidates)
    if not chosen and not search.extra_candidates:
        ceilings = [n for n in ("active_param_budget", "memory_budget_gib")
                    if getattr(search, n) is not None]
        under = f" under search.{' and search.'.join(ceilings)}" if ceilings else ""
        raise ConfigError("search.tolerance", f"no candidate within {search.tolerance:.0%} of "
                          f"{budget} parameters{under} on the grid of {search.axes}",
                          "widen search.tolerance, lower min_fraction or step of an axis, or "
                          "add axes")
    chosen += [extra_candidate(src, e, prune) for e in search.extra_candidates]
    names = [c.name for c in chosen]
    if len(set(names)) != len(names):
        raise ConfigError("search.extra_candidates", f"a name repeats among {names}",
                          "name the extra candidates differently")
    return chosen
