"""`minitron importance`: which scores to estimate, how to aggregate them, where to write them."""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_minitron.config.errors import ConfigError

AGGREGATIONS = ("mean", "l2", "var")
SOURCES = ("activation", "magnitude", "random")
HEAD_SCORES = ("output", "projected")
PRECISIONS = ("fp32", "auto")


@dataclass
class ImportanceConfig:
    """Activation-based width scores and depth scores from forward passes on calibration data.

    Width: each sample's activations are first reduced over the sequence (seq_aggregation),
    then the per-sample values over all samples (sample_aggregation). "mean" averages |x|,
    "l2" is the Euclidean norm, "var" the (population) variance of x. Tokens with loss_mask
    0 (padding) count in no statistic, and a sample with none left counts as no sample.

    The "magnitude" and "random" sources are baselines to compare pruning quality against;
    they read no data and write the same scores file (importance/baselines.py)."""

    source: str = "activation"
    """Where width scores come from. "activation": forward passes on calibration data (the
    Minitron method). "magnitude": weight norms only; a neuron scores ||its linear_fc1 rows||
    x ||its linear_fc2 column||, a head ||its group's value rows|| x ||its linear_proj
    columns||, a channel ||what writes it|| x ||what reads it||; no depth scores. "random":
    uniform scores from runtime.seed, depth scores included (random layer ranking)."""

    checkpoint: Optional[str] = None
    """Checkpoint to score (a step folder or a root holding `latest`). None: checkpoint.load."""
    output: Optional[str] = None
    """Scores file to write; None: RUN_DIR/importance/scores.safetensors."""
    num_samples: int = 1024
    """Calibration sequences over all data-parallel ranks (the Minitron paper uses 1024)."""
    micro_batch_size: int = 4
    """Sequences per forward pass on one data-parallel rank."""
    seq_aggregation: str = "mean"
    """Reduction of one sample's activations over its tokens: mean, l2 or var."""
    sample_aggregation: str = "l2"
    """Reduction of the per-sample values over samples: mean, l2 or var."""
    head_score: str = "output"
    """What an attention head's activation is. "output": its attention output, the input of
    linear_proj (the Minitron paper). "projected": what it writes to the residual stream, its
    output through its columns of linear_proj (sees a head whose projection is small)."""
    width: bool = True
    """Score MLP neurons, attention heads, query groups and embedding channels."""
    depth_cosine: bool = True
    """Score each layer by 1 - mean cosine(layer input, layer output)."""
    depth_loss: bool = True
    """Score each layer by the LM-loss increase when it is skipped (one extra pass per layer)."""
    depth_samples: Optional[int] = None
    """Calibration sequences (of the num_samples, over all data-parallel ranks) for the
    skip-one-layer and block losses, which cost one forward pass each: fewer than num_samples
    makes depth scoring that much cheaper (the loss differences of whole layers are large next
    to their sampling noise). The unskipped loss they are compared with is taken on the same
    samples. None: all num_samples."""
    precision: str = "fp32"
    """Precision of the scoring forward passes. "fp32" (default): the scores, and so which
    heads, neurons, channels and layers a prune keeps, are the same on every machine, whatever
    runtime.precision=auto picks there (bf16 activations round ties and near-ties differently).
    "auto": runtime.precision's choice, about half the activation memory on a large model.
    Statistics accumulate in fp32 either way."""
    block_sizes: List[int] = field(default_factory=list)
    """For each k: LM-loss increase when each contiguous block of k layers is skipped (one pass
    per block). Depth pruning to num_layers - k by contiguous block needs k here."""

    def __post_init__(self):
        if self.source not in SOURCES:
            raise ConfigError("importance.source", f"unknown {self.source!r}",
                              f"use one of {SOURCES}")
        if self.precision not in PRECISIONS:
            raise ConfigError("importance.precision", f"unknown {self.precision!r}",
                              f"use one of {PRECISIONS}")
        if self.head_score not in HEAD_SCORES:
            raise ConfigError("importance.head_score", f"unknown {self.head_score!r}",
                              f"use one of {HEAD_SCORES}")
        for name in ("seq_aggregation", "sample_aggregation"):
            if getattr(self, name) not in AGGREGATIONS:
                raise ConfigError(f"importance.{name}", f"unknown {getattr(self, name)!r}",
                                  f"use one of {AGGREGATIONS}")
        if self.depth_samples is not None and not 1 <= self.depth_samples <= self.num_samples:
            raise ConfigError("importance.depth_samples", f"{self.depth_samples} is not in "
                              f"[1, num_samples={self.num_samples}]",
                              "use a positive count up to importance.num_samples, or null")
        for name in ("num_samples", "micro_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"importance.{name}", "must be >= 1", "use a positive integer")
        if any(k < 1 for k in self.block_sizes):
            raise ConfigError("importance.block_sizes", f"{self.block_sizes} has a size < 1",
                              "use positive block sizes")
        if not (self.width or self.depth_cosine or self.depth_loss or self.block_sizes):
            raise ConfigError("importance.width", "every score is switched off",
                              "enable width, depth_cosine, depth_loss or block_sizes")
