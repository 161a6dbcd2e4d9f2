"""Training for a wall-clock budget instead of a step count (train.time_budget_s).

The loop adds each optimizer step's seconds (the slowest rank's, so every rank stops after the
same step and tensor-parallel ranks apply the same learning rate) and stops once the budget is
spent. The seconds are saved with each checkpoint and restored on resume. With
lr_decay_style=wsd the learning rate after warmup is held at its peak until the last
lr_wsd_decay_fraction of the budget, then falls linearly to min_lr as the budget runs out: the
step count is unknown, so the decay follows the fraction of time spent. megatron's scheduler
still runs the warmup (by steps) and keeps its state; for such a run it is built constant
(training/optimizer.py) and this module sets the decayed rate before each step."""

from dataclasses import dataclass
from typing import Optional

import torch
import torch.distributed as dist

from megatron_minitron.config.train import TrainConfig


def wsd_coefficient(spent_fraction: float, decay_fraction: float) -> float:
    """1 until 1 - decay_fraction of the budget is spent, then linear down to 0 at its end."""
    start = 1.0 - decay_fraction
    if spent_fraction <= start:
        return 1.0
    return max(0.0, 1.0 - (spent_fraction - start) / decay_fraction)


@dataclass(frozen=True)
class TimeBudget:
    seconds: float
    decay_fraction: Optional[float]
    """wsd: the last share of the budget that decays; None: the scheduler's constant rate."""

    @classmethod
    def of(cls, train: TrainConfig) -> Optional["TimeBudget"]:
        if train.time_budget_s <= 0:
            return None
        opt = train.optimizer
        return cls(train.time_budget_s,
                   opt.lr_wsd_decay_fraction if opt.lr_decay_style == "wsd" else None)

    def spent(self, train_seconds: float) -> bool:
        return train_seconds >= self.seconds

    def set_lr(self, scheduler, train_seconds: float) -> None:
        """The learning rate of the next step, after warmup: min_lr + coeff (max_lr - min_lr)
        for each param group (its own max_lr / min_lr where megatron's scheduler reads them)."""
        if self.decay_fraction is None:
            return
        if scheduler.lr_warmup_steps > 0 and scheduler.num_steps <= scheduler.lr_warmup_steps:
            return
        coeff = wsd_coefficient(min(train_seconds / self.seconds, 1.0), self.decay_fraction)
        for group in scheduler.optimizer.param_groups:
            max_lr = group.get("max_lr", scheduler.max_lr)
            min_lr = group.get("min_lr", scheduler.min_lr)
            group["lr"] = min_lr + coeff * (max_lr - min_lr)


def agreed_seconds(seconds: float, device: torch.device) -> float:
    """The largest of every rank's `seconds` (all ranks get the same value)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return seconds
    t = torch.tensor([seconds], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)
