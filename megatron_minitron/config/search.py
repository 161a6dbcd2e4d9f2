"""`minitron search`: candidate architectures under a parameter budget, ranked by a short
distillation each."""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.footprint import DTYPE_BYTES
from megatron_minitron.config.prune import AXES, DEPTH_MODES, PruneTarget

SEARCH_DEPTH_MODES = ("score", "block")
METRICS = ("lm_loss", "kd_loss")


@dataclass
class AxisRange:
    """The sizes one axis may take: multiples of `step` (and the source's own size) between
    min_fraction and max_fraction of the source's size."""

    min_fraction: float = 0.25
    """Smallest size tried, as a fraction of the source's."""
    max_fraction: float = 1.0
    """Largest size tried, as a fraction of the source's (1.0 lets the axis stay unpruned)."""
    step: Optional[int] = None
    """Grid spacing. None: source size / 16 (at least 1), i.e. at most 16 sizes per axis.
    prune.*_divisor and the TP size still apply on top of it."""

    def check(self, name: str) -> None:
        if not 0.0 < self.min_fraction <= self.max_fraction <= 1.0:
            raise ConfigError(f"search.{name}.min_fraction", f"needs 0 < min_fraction <= "
                              f"max_fraction <= 1, got {self.min_fraction}, {self.max_fraction}",
                              "use fractions of the source size such as 0.5 and 1.0")
        if self.step is not None and self.step < 1:
            raise ConfigError(f"search.{name}.step", f"must be >= 1, got {self.step}",
                              "use a positive step or null")


@dataclass
class ExtraCandidate:
    """A candidate given by hand, ranked with the enumerated ones (it is not held to the
    budget tolerance and does not count against max_candidates)."""

    name: Optional[str] = None
    """Folder and table name. None: derived from the sizes."""
    target: PruneTarget = field(default_factory=PruneTarget)
    """Sizes; unset axes keep the source's."""
    depth_mode: str = "score"
    """"score", "block" or "list" (drop exactly drop_layers), as prune.depth_mode."""
    drop_layers: List[int] = field(default_factory=list)
    """1-based layer numbers to drop for depth_mode "list"."""

    def __post_init__(self):
        if self.depth_mode not in DEPTH_MODES:
            raise ConfigError("search.extra_candidates.depth_mode", f"unknown "
                              f"{self.depth_mode!r}", f"use one of {DEPTH_MODES}")
        if self.depth_mode == "list" and not self.drop_layers:
            raise ConfigError("search.extra_candidates.drop_layers", "depth_mode is 'list' but "
                              "the list is empty", "list 1-based layer numbers to drop")


@dataclass
class SearchConfig:
    """The candidate space, the budget and the per-candidate distillation."""

    param_budget: Optional[int] = None
    """Target parameter count of the student (None: prune.param_budget). Counted like
    prune.param_budget, with or without embeddings per prune.budget_include_embeddings."""
    tolerance: float = 0.05
    """Keep candidates whose count lies within param_budget x (1 +- tolerance)."""
    active_param_budget: Optional[int] = None
    """Also a ceiling on the parameters one token uses (config.moe.num_active_parameters:
    a mixture of experts counts its moe_router_topk experts per layer; a dense model all its
    parameters), with or without embeddings per prune.budget_include_embeddings. None: none."""
    memory_budget_gib: Optional[float] = None
    """Also a ceiling on inference memory in GiB: every weight and the KV cache, both at
    memory_dtype, for memory_batch_size sequences of memory_context_length tokens
    (config.footprint.inference_memory_bytes). None: none."""
    memory_dtype: str = "bfloat16"
    """Weight and KV-cache dtype of memory_budget_gib: float32, bfloat16, float16 or fp8."""
    memory_context_length: int = 4096
    """Tokens per sequence in the KV cache of memory_budget_gib."""
    memory_batch_size: int = 1
    """Sequences held at once in the KV cache of memory_budget_gib."""
    axes: List[str] = field(default_factory=lambda: list(AXES))
    """Axes the search may shrink; the others keep the source's size."""
    hidden_size: AxisRange = field(default_factory=AxisRange)
    """Sizes tried for hidden_size."""
    ffn_hidden_size: AxisRange = field(default_factory=AxisRange)
    """Sizes tried for ffn_hidden_size."""
    num_attention_heads: AxisRange = field(default_factory=AxisRange)
    """Sizes tried for num_attention_heads."""
    num_query_groups: AxisRange = field(default_factory=AxisRange)
    """Sizes tried for num_query_groups."""
    num_layers: AxisRange = field(default_factory=lambda: AxisRange(min_fraction=0.5))
    """Sizes tried for num_layers (Minitron: more than half the layers rarely pays off)."""
    depth_mode: str = "score"
    """How candidates that drop layers choose them: "score" (prune.depth_metric) or "block"
    (the cheapest contiguous block; needs importance.block_sizes to hold every drop count)."""
    max_candidates: int = 8
    """Most enumerated candidates trained. The closest to the budget are kept, taken in turn
    from depth-only, width-only and mixed candidates (and, inside each, from every set of
    shrunk axes) so that the kept ones differ in shape."""
    extra_candidates: List[ExtraCandidate] = field(default_factory=list)
    """Hand-written candidates ranked beside the enumerated ones."""
    checkpoint: Optional[str] = None
    """Source checkpoint to prune. None: prune.checkpoint, then checkpoint.load."""
    scores: Optional[str] = None
    """Scores file. None: prune.scores, then RUN_DIR/importance/scores.safetensors."""
    distill_iters: int = 50
    """Distillation steps per candidate (train.* gives batch sizes and the optimizer)."""
    distill_tokens: Optional[int] = None
    """Distillation tokens per candidate; when set, replaces distill_iters (rounded up to whole
    steps of train.global_batch_size x data.seq_length)."""
    eval_iters: int = 8
    """Validation batches of the final evaluation: every candidate sees the same ones."""
    metric: str = "lm_loss"
    """Ranking metric on the validation batches: "lm_loss" (cross entropy on the data) or
    "kd_loss" (divergence from the teacher)."""
    zero_shot: bool = False
    """Rank by the validation loss right after pruning, with no distillation (the reference
    implementation's behaviour; cheaper, and often a poor predictor)."""
    output: Optional[str] = None
    """Where to write the ranking and the candidates. None: run.dir/search."""

    def __post_init__(self):
        bad = [a for a in self.axes if a not in AXES]
        if bad:
            raise ConfigError("search.axes", f"unknown axes {bad}", f"use a subset of {AXES}")
        for name in AXES:
            getattr(self, name).check(name)
        if not 0.0 <= self.tolerance < 1.0:
            raise ConfigError("search.tolerance", f"must be in [0, 1), got {self.tolerance}",
                              "use a fraction such as 0.05")
        if self.param_budget is not None and self.param_budget < 1:
            raise ConfigError("search.param_budget", "must be >= 1", "use a positive count")
        if self.active_param_budget is not None and self.active_param_budget < 1:
            raise ConfigError("search.active_param_budget", "must be >= 1",
                              "use a positive count or null")
        if self.memory_budget_gib is not None and self.memory_budget_gib <= 0:
            raise ConfigError("search.memory_budget_gib", "must be > 0", "use GiB or null")
        if self.memory_dtype not in DTYPE_BYTES:
            raise ConfigError("search.memory_dtype", f"unknown {self.memory_dtype!r}",
                              f"use one of {sorted(DTYPE_BYTES)}")
        for name in ("memory_context_length", "memory_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"search.{name}", "must be >= 1", "use a positive integer")
        if self.depth_mode not in SEARCH_DEPTH_MODES:
            raise ConfigError("search.depth_mode", f"unknown {self.depth_mode!r}",
                              f"use one of {SEARCH_DEPTH_MODES}")
        if self.metric not in METRICS:
            raise ConfigError("search.metric", f"unknown {self.metric!r}",
                              f"use one of {METRICS}")
        for name in ("max_candidates", "distill_iters", "eval_iters"):
            if getattr(self, name) < 1:
                raise ConfigError(f"search.{name}", "must be >= 1", "use a positive integer")
        if self.distill_tokens is not None and self.distill_tokens < 1:
            raise ConfigError("search.distill_tokens", "must be >= 1",
                              "use a positive count or null")
        names = [c.name for c in self.extra_candidates if c.name]
        if len(set(names)) != len(names):
            raise ConfigError("search.extra_candidates", f"names {names} repeat",
                              "give every extra candidate its own name")
