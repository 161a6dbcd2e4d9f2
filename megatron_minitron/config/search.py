"""`minitron search`: candidate architectures under a parameter budget, ranked by a short
distillation each."""

from dataclasses import dataclass
from typing import Optional


@dataclass
class SearchConfig:
    """The candidate space, the budget and the per-candidate distillation."""

    param_budget: Optional[int] = None
    """Target parameter count of the student (None: prune.param_budget)."""
    output: Optional[str] = None
    """Where to write the ranking and the candidates. None: run.dir/search."""
