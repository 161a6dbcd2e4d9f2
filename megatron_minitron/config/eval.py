"""`minitron eval`: held-out perplexity and lm-eval-harness tasks for one of our checkpoints."""

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class EvalConfig:
    """What to evaluate and on which data."""

    checkpoint: Optional[str] = None
    """Checkpoint to evaluate (a step folder or a root holding `latest`). None: checkpoint.load."""
    output: Optional[str] = None
    """Where to write eval.json. None: run.dir/eval."""
    tasks: List[str] = field(default_factory=list)
    """lm-eval-harness tasks to run after perplexity (empty: perplexity only)."""
