"""`minitron pipeline`: the whole recipe, teacher -> importance -> prune -> distill -> eval."""

from dataclasses import dataclass, field
from typing import List


@dataclass
class PipelineConfig:
    """Which stages run and how they chain. Each writes under run.dir/<stage>."""

    force: List[str] = field(default_factory=list)
    """Stages to rerun even when their finished output is present."""
