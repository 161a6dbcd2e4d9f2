"""`minitron cache-teacher`: what of the teacher's next-token distributions is cached, and where."""

from dataclasses import dataclass
from typing import Optional

from megatron_minitron.config.errors import ConfigError

CACHE_MODES = ("topk", "sampled", "both")
LOGPROB_DTYPES = ("float16", "float32")


@dataclass
class CacheConfig:
    """One pass of the teacher (distill.teacher_checkpoint) over the distillation data: the
    train split's first train.train_iters x train.global_batch_size samples and the validation
    split's first train.eval_iters x train.global_batch_size samples (what `minitron distill`
    with the same data and train settings reads). Per token it stores the teacher's top-k
    log-probabilities and the log of the tail mass, or k tokens sampled from the teacher's
    distribution with their counts ("Sparse Logit Sampling", ACL 2025), or both. Records are
    keyed by (split, global sample index, position), so any TP / PP / DP layout and
    micro-batch size reads them, at writing and at reading."""

    mode: str = "sampled"
    """"topk": the k most likely tokens' log-probabilities plus one tail bucket (a biased
    estimate of the teacher); "sampled": k draws from the teacher's distribution at
    `temperature`, stored as distinct token ids with counts (an unbiased estimate of the cross
    entropy to the teacher); "both": both records."""
    k: int = 32
    """Top-k tokens, or samples drawn, per token (at most 255 in sampled mode: counts are
    stored in 8 bits)."""
    temperature: float = 1.0
    """The teacher's logits are divided by this before the softmax; `minitron distill` must use
    the same distill.temperature."""
    output: Optional[str] = None
    """The cache folder; None: RUN_DIR/teacher_cache. Writing resumes in a folder holding an
    interrupted cache with the same header."""
    shard_samples: int = 64
    """Samples per shard file of one data-parallel rank (a resume redoes at most one shard per
    rank)."""
    logprob_dtype: str = "float16"
    """Storage of the top-k log-probabilities, the tail log-mass and the teacher entropy:
    "float16" (2 bytes) or "float32" (exact reading of what the teacher computed in fp32)."""

    def __post_init__(self):
        if self.mode not in CACHE_MODES:
            raise ConfigError("cache.mode", f"unknown {self.mode!r}", f"use one of {CACHE_MODES}")
        if self.logprob_dtype not in LOGPROB_DTYPES:
            raise ConfigError("cache.logprob_dtype", f"unknown {self.logprob_dtype!r}",
                              f"use one of {LOGPROB_DTYPES}")
        if self.k < 1 or (self.mode != "topk" and self.k > 255):
            raise ConfigError("cache.k", f"{self.k} is out of range",
                              "use 1..255 with sampled/both (8-bit counts), >= 1 with topk")
        if self.temperature <= 0:
            raise ConfigError("cache.temperature", f"must be > 0, got {self.temperature}",
                              "use a positive temperature, e.g. 1.0")
        if self.shard_samples < 1:
            raise ConfigError("cache.shard_samples", "must be >= 1", "use e.g. 64")
