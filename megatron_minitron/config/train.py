"""The training loop's knobs: batches, optimizer, schedule, validation, checkpoints, logging."""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_minitron.config.errors import ConfigError


@dataclass
class OptimizerConfig:
    """Adam with decoupled weight decay and gradient clipping (megatron-core optimizer)."""

    lr: float = 3e-4
    """Peak learning rate."""
    min_lr: float = 3e-5
    """Learning rate at the end of cosine decay."""
    weight_decay: float = 0.01
    """Decoupled weight decay (not applied to norms and biases)."""
    adam_beta1: float = 0.9
    """Adam beta1."""
    adam_beta2: float = 0.95
    """Adam beta2."""
    adam_eps: float = 1e-8
    """Adam epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this (0 disables)."""
    lr_warmup_iters: int = 10
    """Linear warmup steps."""
    lr_decay_style: str = "cosine"
    """"cosine", "linear", "constant" or "wsd" (warmup-stable-decay: constant after warmup,
    then linear to min_lr over the last lr_wsd_decay_fraction of the run: of
    train.time_budget_s when one is set, else of the steps)."""
    lr_wsd_decay_fraction: float = 0.2
    """lr_decay_style=wsd: the share of the run (time or steps) that decays."""

    def __post_init__(self):
        if self.lr <= 0 or self.min_lr < 0 or self.min_lr > self.lr:
            raise ConfigError("train.optimizer.lr", f"lr={self.lr}, min_lr={self.min_lr}",
                              "use 0 <= min_lr <= lr and lr > 0")
        if self.lr_decay_style not in DECAY_STYLES:
            raise ConfigError("train.optimizer.lr_decay_style", f"unknown {self.lr_decay_style!r}",
                              f"use one of {', '.join(DECAY_STYLES)}")
        if not 0 < self.lr_wsd_decay_fraction <= 1:
            raise ConfigError("train.optimizer.lr_wsd_decay_fraction",
                              f"{self.lr_wsd_decay_fraction} not in (0, 1]", "use e.g. 0.2")


DECAY_STYLES = ("cosine", "linear", "constant", "wsd")
STEP_COUNTED_STYLES = ("cosine", "linear")
"""Decay styles defined over train_iters steps, which a time budget does not fix."""


def time_budget_problem(style: str, budget_s: float) -> Optional[str]:
    """Why a time budget cannot drive this schedule, or None."""
    if budget_s > 0 and style in STEP_COUNTED_STYLES:
        return (f"lr_decay_style={style} decays over train_iters steps, which a time budget of "
                f"{budget_s:g} s does not fix")
    return None


@dataclass
class TrainConfig:
    """Steps, batch sizes and validation cadence."""

    train_iters: int = 100
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Samples per forward/backward on one data-parallel rank."""
    global_batch_size: int = 8
    """Samples per optimizer step over all data-parallel ranks (gradient accumulation fills
    the gap)."""
    eval_interval: int = 50
    """Validate every this many steps (0: only at the end)."""
    eval_iters: int = 4
    """Validation batches per evaluation."""
    log_interval: int = 1
    """Log every this many steps."""
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    """Optimizer and LR schedule."""
    time_budget_s: float = 0.0
    """Train until this many seconds of optimizer steps are spent (validation and checkpoint
    writes are not counted; the count is saved with each checkpoint, so a resumed or requeued
    run continues the same budget), or train_iters steps, whichever comes first; the steps and
    tokens actually used are logged (consumed_tokens) and reported. 0: train_iters steps.
    Needs optimizer.lr_decay_style constant or wsd (decay over the budget's last fraction)."""
    exit_after_iters: Optional[int] = None
    """Stop (after checkpointing) once this many steps ran in this process; for tests of
    resume and for time-sliced jobs."""
    max_nonfinite_steps: int = 3
    """A step whose loss or gradient norm is NaN/inf is skipped (no optimizer update); this
    many in a row stop the stage with an error (the run has diverged)."""
    fused_lm_loss: bool = True
    """LM training (`minitron train`, teacher correction): compute the output layer and the
    cross entropy together, chunk by chunk from the final hidden states, so no
    [tokens, vocab] logits tensor is made (distill/fused_output.py); false: GPTModel's own
    output layer and megatron's vocab-parallel cross entropy. Same loss and gradients to
    rounding. (Distillation has its own switch, distill.fused_output.)"""

    def __post_init__(self):
        for name in ("train_iters", "micro_batch_size", "global_batch_size", "eval_iters",
                     "log_interval", "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name}", "must be >= 1", "use a positive integer")
        if self.time_budget_s < 0:
            raise ConfigError("train.time_budget_s", f"{self.time_budget_s} < 0",
                              "use 0 for no budget, or the seconds to train")
        problem = time_budget_problem(self.optimizer.lr_decay_style, self.time_budget_s)
        if problem:
            raise ConfigError("train.optimizer.lr_decay_style", problem,
                              "use constant, or wsd to decay over the budget's last "
                              "lr_wsd_decay_fraction")
        if self.optimizer.lr_warmup_iters >= self.train_iters:
            raise ConfigError("train.optimizer.lr_warmup_iters",
                              f"{self.optimizer.lr_warmup_iters} warmup steps for "
                              f"{self.train_iters} train_iters",
                              "use fewer warmup steps than train_iters")

    def num_microbatches(self, data_parallel_size: int) -> int:
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            raise ConfigError(
                "train.global_batch_size",
                f"{self.global_batch_size} is not divisible by micro_batch_size x DP = "
                f"{self.micro_batch_size} x {data_parallel_size}",
                f"use a multiple of {per_step}",
            )
        return self.global_batch_size // per_step


@dataclass
class CheckpointConfig:
    """Where checkpoints go and what is loaded."""

    save: Optional[str] = None
    """Checkpoint folder; None means RUN_DIR/checkpoints."""
    save_interval: int = 0
    """Save every this many steps (0: only at the end)."""
    keep_last: int = 2
    """Keep this many most recent checkpoints."""
    load: Optional[str] = None
    """Initial weights: one of our checkpoints (a step folder or a folder of them). Its model
    config replaces the model section. Resuming from checkpoint.save wins over this."""
    finetune: bool = True
    """With load: take weights only (fresh optimizer, step 0). False continues its run state
    (step, consumed samples, optimizer and LR schedule when saved), writing new checkpoints to
    checkpoint.save."""
    verify: bool = True
    """Check every file of a checkpoint against the hashes in its minitron.json before loading
    it (resume, checkpoint.load, teachers); false skips the check."""

    def __post_init__(self):
        if self.keep_last < 1:
            raise ConfigError("checkpoint.keep_last", "must be >= 1", "keep at least one")


@dataclass
class LoggerConfig:
    """Console, JSONL and W&B logging."""

    backend: str = "wandb"
    """"wandb" or "none" (the JSONL metrics file and console are always written)."""
    project: str = "megatron_minitron"
    """W&B project."""
    entity: Optional[str] = None
    """W&B entity (team)."""
    name: Optional[str] = None
    """W&B run name; None uses the run folder's name."""
    group: Optional[str] = None
    """W&B group."""
    tags: List[str] = field(default_factory=list)
    """W&B tags."""
    mode: str = "offline"
    """W&B mode: "offline" (default; sync later with `wandb sync`), "online" or "disabled"."""
    progress_bar: bool = True
    """Show a progress bar on rank 0."""
    verbose: bool = False
    """Also show the progress bars and notices of the libraries a stage calls (lm-eval,
    transformers, datasets, huggingface_hub) on the console. False: they go to the stage's
    `stage.log` (runtime/console.py)."""

    def __post_init__(self):
        if self.backend not in ("wandb", "none"):
            raise ConfigError("logger.backend", f"unknown {self.backend!r}", "use wandb or none")
        if self.mode not in ("offline", "online", "disabled"):
            raise ConfigError("logger.mode", f"unknown {self.mode!r}",
                              "use offline, online or disabled")
