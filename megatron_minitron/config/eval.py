"""`minitron eval`: held-out perplexity and lm-eval-harness tasks for one of our checkpoints."""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_minitron.config.errors import ConfigError

EVAL_SPLITS = ("train", "valid", "test")


@dataclass
class EvalConfig:
    """What to evaluate and on which data."""

    checkpoint: Optional[str] = None
    """Checkpoint to evaluate (a step folder or a root holding `latest`). None: checkpoint.load."""
    output: Optional[str] = None
    """Folder for eval.json. None: run.dir/eval."""
    splits: List[str] = field(default_factory=lambda: ["valid", "test"])
    """Splits of the run's data (data.paths, data.split) to measure loss and perplexity on."""
    num_samples: int = 64
    """Samples (of data.seq_length tokens) per split, at most the split's size; rounded down
    to whole groups of micro_batch_size x data-parallel size."""
    micro_batch_size: int = 4
    """Samples per forward pass on one data-parallel rank (perplexity and lm-eval alike)."""
    heldout_chars: int = 20000
    """With the demo corpus (data.paths empty): also score this many characters of The Tempest,
    which no demo split contains, as the set "heldout". 0 skips it."""
    text_files: List[str] = field(default_factory=list)
    """Plain text files to score as well (whole file, in data.seq_length windows), each
    reported under its file name."""
    tasks: List[str] = field(default_factory=list)
    """lm-eval-harness tasks or tags to run after perplexity (empty: perplexity only). Shipped:
    minitron_next_line, minitron_cloze, minitron_tempest and their tag minitron_demo."""
    task_paths: List[str] = field(default_factory=list)
    """Extra folders of lm-eval task YAMLs (over local JSONL files: runs stay offline)."""
    limit: Optional[int] = None
    """Documents per lm-eval task (None: all)."""
    num_fewshot: Optional[int] = None
    """Few-shot examples per lm-eval prompt (None: each task's default)."""
    max_gen_toks: int = 32
    """Most tokens greedy generation adds for generate_until tasks that do not say."""
    cache: bool = True
    """`minitron pipeline`'s eval stage: reuse the scores of a checkpoint scored before with
    the same file hashes, settings and code (eval/score_cache.py; in data.cache_dir), as the
    teacher is in every rerun. false: always score again."""

    def __post_init__(self):
        bad = [s for s in self.splits if s not in EVAL_SPLITS]
        if bad:
            raise ConfigError("eval.splits", f"unknown splits {bad}", f"use some of {EVAL_SPLITS}")
        for name in ("num_samples", "micro_batch_size", "max_gen_toks"):
            if getattr(self, name) < 1:
                raise ConfigError(f"eval.{name}", "must be >= 1", "use a positive integer")
        if self.heldout_chars < 0:
            raise ConfigError("eval.heldout_chars", "must be >= 0", "use 0 to skip it")
        if self.limit is not None and self.limit < 1:
            raise ConfigError("eval.limit", "must be >= 1 or null", "use null for all documents")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ConfigError("eval.num_fewshot", "must be >= 0 or null", "use 0 for zero-shot")
