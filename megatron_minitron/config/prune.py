"""`minitron prune`: the target architecture and how surviving heads, neurons and layers are chosen."""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_minitron.config.errors import ConfigError

HEAD_MODES = ("heads", "groups")
DEPTH_MODES = ("score", "block", "list")
DEPTH_METRICS = ("loss", "cosine")
AXES = ("num_query_groups", "num_attention_heads", "hidden_size", "ffn_hidden_size", "num_layers")
"""Target axes in dependency order: validity of each may depend on the ones before it."""
MOE_AXES = ("num_moe_experts", "moe_ffn_hidden_size", "moe_shared_expert_intermediate_size")
"""Mixture-of-experts target axes (pruning/experts.py)."""


@dataclass
class PruneTarget:
    """Target sizes in megatron-core names; None keeps the source's value (or lets the budget
    choose it). kv_channels never changes."""

    hidden_size: Optional[int] = None
    """Embedding channels to keep (ranked by channel score)."""
    ffn_hidden_size: Optional[int] = None
    """MLP neurons to keep in every layer (ranked per layer)."""
    num_attention_heads: Optional[int] = None
    """Query heads to keep in every layer."""
    num_query_groups: Optional[int] = None
    """Key/value groups to keep in every layer. None: unchanged in "heads" mode, and
    num_attention_heads / heads_per_group in "groups" mode."""
    num_layers: Optional[int] = None
    """Transformer layers to keep."""
    num_moe_experts: Optional[int] = None
    """Routed experts to keep in every MoE layer (ranked per layer by moe.experts); the
    router's rows and the experts' weights are sliced together."""
    moe_ffn_hidden_size: Optional[int] = None
    """Neurons to keep in every routed expert (ranked per expert by moe.neurons)."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Neurons to keep in every shared expert (ranked per layer by moe.shared_neurons)."""

    def __post_init__(self):
        for name in AXES + MOE_AXES:
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"prune.target.{name}", f"must be >= 1, got {v}",
                                  "use a positive size or null to keep the source's")


@dataclass
class PruneConfig:
    """Slice a checkpoint to a smaller architecture using an importance scores file."""

    checkpoint: Optional[str] = None
    """Checkpoint to prune. None: checkpoint.load."""
    scores: Optional[str] = None
    """Scores file from `minitron importance`. None: RUN_DIR/importance/scores.safetensors."""
    output: Optional[str] = None
    """Root folder of the pruned checkpoint. None: RUN_DIR/pruned."""
    target: PruneTarget = field(default_factory=PruneTarget)
    """Explicit target sizes."""
    param_budget: Optional[int] = None
    """Total parameters of the pruned model; resolved to sizes of budget_axes that the target
    leaves unset, shrinking them by one common ratio."""
    budget_axes: List[str] = field(default_factory=lambda: ["hidden_size", "ffn_hidden_size"])
    """Axes the parameter budget may shrink."""
    budget_include_embeddings: bool = True
    """Count embedding and output-layer parameters against param_budget."""
    head_mode: str = "heads"
    """"heads": drop the lowest-ranked query heads inside every group (keeps the KV cache);
    "groups": drop whole query groups by group score (keeps heads per group)."""
    depth_mode: str = "score"
    """"score": drop the lowest-scored layers (depth_metric); "block": drop the contiguous block
    whose removal costs least LM loss (needs importance.block_sizes to hold the block size);
    "list": drop drop_layers."""
    depth_metric: str = "loss"
    """Layer score for depth_mode "score": "loss" (skip-one LM-loss increase) or "cosine"."""
    drop_layers: List[int] = field(default_factory=list)
    """1-based layer numbers to drop for depth_mode "list"."""
    tensor_model_parallel_size: int = 1
    """Largest TP the pruned model must run at: heads, groups and ffn must divide by it."""
    pipeline_model_parallel_size: int = 1
    """PP the pruned model must run at: num_layers must divide by it."""
    ffn_hidden_size_divisor: int = 1
    """The kept ffn_hidden_size must be a multiple of this (e.g. 64 for fast GPU kernels)."""
    hidden_size_divisor: int = 1
    """The kept hidden_size must be a multiple of this."""
    require_hf_export: bool = True
    """Refuse targets that Hugging Face cannot load (hidden_size % num_attention_heads != 0);
    false only warns."""
    step: int = 0
    """Step number the pruned checkpoint is saved under."""

    def __post_init__(self):
        if self.head_mode not in HEAD_MODES:
            raise ConfigError("prune.head_mode", f"unknown {self.head_mode!r}",
                              f"use one of {HEAD_MODES}")
        if self.depth_mode not in DEPTH_MODES:
            raise ConfigError("prune.depth_mode", f"unknown {self.depth_mode!r}",
                              f"use one of {DEPTH_MODES}")
        if self.depth_metric not in DEPTH_METRICS:
            raise ConfigError("prune.depth_metric", f"unknown {self.depth_metric!r}",
                              f"use one of {DEPTH_METRICS}")
        bad = [a for a in self.budget_axes if a not in AXES]
        if bad or not self.budget_axes:
            raise ConfigError("prune.budget_axes", f"unknown or no axes {bad}",
                              f"use a non-empty subset of {AXES}")
        if self.param_budget is not None and self.param_budget < 1:
            raise ConfigError("prune.param_budget", "must be >= 1", "use a positive count")
        if self.depth_mode == "list" and not self.drop_layers:
            raise ConfigError("prune.drop_layers", "depth_mode is 'list' but the list is empty",
                              "list 1-based layer numbers to drop, or use depth_mode=score")
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "ffn_hidden_size_divisor", "hidden_size_divisor"):
            if getattr(self, name) < 1:
                raise ConfigError(f"prune.{name}", "must be >= 1", "use a positive integer")
