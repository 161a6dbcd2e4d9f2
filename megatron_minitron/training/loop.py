"""The one training loop. Pretraining, teacher correction and distillation differ only in the
step object (LMStep, KDStep) that turns a micro-batch into a loss."""

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterator, List, Optional, Protocol

import torch
import torch.distributed as dist

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.runtime.distributed import ParallelContext
from megatron_minitron.runtime.signals import PreemptionFlag, Requeue
from megatron_minitron.training.metrics import MetricsWriter
from megatron_minitron.runtime.progress import Progress
from megatron_minitron.training.nonfinite import (NonFiniteError, NonFiniteGuard,
                                                  first_nonfinite, guarded_step)
from megatron_minitron.training.time_budget import TimeBudget, agreed_seconds


class DataSource(Protocol):
    def train_iterator(self, consumed_samples: int) -> Iterator[Dict[str, torch.Tensor]]: ...

    def valid_iterator(self) -> Iterator[Dict[str, torch.Tensor]]: ...


class Step(Protocol):
    loss_names: tuple
    adjust_tensor_shapes_fn: Optional[Callable]
    """None, or megatron's hook that changes what pipeline stages exchange (distillation)."""

    def forward_step(self, data_iterator, model): ...


@dataclass
class LoopState:
    step: int = 0
    consumed_samples: int = 0
    last_losses: Dict[str, float] = field(default_factory=dict)
    last_valid: Dict[str, float] = field(default_factory=dict)
    train_seconds: float = 0.0
    """Seconds of optimizer steps so far, over resumes (kept when train.time_budget_s is set)."""
    budget_spent: bool = False
    """The run stopped because train.time_budget_s was spent (before train_iters)."""


class Trainer:
    clock = staticmethod(time.perf_counter)
    """Seconds of a step (tokens_per_s, train.time_budget_s); tests give it a fake clock."""

    def __init__(self, cfg: MinitronConfig, ctx: ParallelContext, chunks: List[torch.nn.Module],
                 step: Step, optimizer, scheduler, data: DataSource, writer: MetricsWriter,
                 make_header: Callable[[LoopState], ckpt.CheckpointHeader]):
        self.cfg, self.ctx, self.chunks, self.step = cfg, ctx, chunks, step
        self.optimizer, self.scheduler, self.data, self.writer = optimizer, scheduler, data, writer
        self.make_header = make_header
        self.num_microbatches = cfg.train.num_microbatches(ctx.dp_size)

    @property
    def checkpoint_root(self) -> str:
        return self.cfg.checkpoint_root

    def _iterators(self, make: Callable[[], Iterator]):
        its = [make() for _ in self.chunks]
        return its[0] if len(its) == 1 else its

    def _schedule(self, data_iterator, forward_only: bool, num_microbatches: int):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        extra = {}
        if self.step.adjust_tensor_shapes_fn is not None:
            extra["adjust_tensor_shapes_fn"] = self.step.adjust_tensor_shapes_fn
        return get_forward_backward_func()(
            forward_step_func=self.step.forward_step, data_iterator=data_iterator,
            model=self.chunks if len(self.chunks) > 1 else self.chunks[0],
            num_microbatches=num_microbatches, seq_length=self.cfg.data.seq_length,
            micro_batch_size=self.cfg.train.micro_batch_size, forward_only=forward_only,
            **extra)

    def _reduce(self, reports: List[Dict[str, torch.Tensor]]) -> Dict[str, float]:
        """Token-weighted means over micro-batches and DP ranks, known on every rank."""
        names = self.step.loss_names
        totals = torch.zeros(len(names), 2, dtype=torch.float64, device=self.ctx.device)
        for r in reports:
            for i, n in enumerate(names):
                if n in r:
                    totals[i] += r[n].to(torch.float64)
        if dist.is_initialized():
            dist.all_reduce(totals, group=self.ctx.dp_cp_group)
            dist.all_reduce(totals, group=self.ctx.pp_group)  # only the last stage is non-zero
        return {n: (totals[i, 0] / totals[i, 1].clamp(min=1)).item() for i, n in enumerate(names)}

    def train_step(self, data_iterator) -> Dict[str, float]:
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        for c in self.chunks:
            c.train()
        reports = self._schedule(data_iterator, False, self.num_microbatches)
        out = self._reduce(reports)
        updated, out["grad_norm"] = guarded_step(
            self.optimizer, all(math.isfinite(v) for v in out.values()))
        if updated:
            self.scheduler.step(increment=self.cfg.train.global_batch_size)
        out["skipped"] = 0.0 if updated else 1.0
        out["lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        for c in self.chunks:
            c.eval()
        it = self._iterators(self.data.valid_iterator)
        per_step = self.cfg.train.global_batch_size // (self.cfg.train.micro_batch_size *
                                                         self.ctx.dp_size)
        reports = self._schedule(it, True, self.cfg.train.eval_iters * per_step)
        return {f"valid_{k}": v for k, v in self._reduce(reports).items()}

    def save(self, state: LoopState) -> None:
        bad = first_nonfinite(self.chunks, self.optimizer, self.ctx.device)
        if bad is not None:
            raise NonFiniteError(
                "train.optimizer.lr", f"not saving step {state.step}: {bad} holds NaN/inf (the "
                f"run diverged); {self.checkpoint_root} keeps its last finite checkpoint",
                "lower train.optimizer.lr or set train.optimizer.clip_grad > 0, then rerun")
        ckpt.save(self.checkpoint_root, state.step, self.chunks, self.make_header(state),
                  optimizer=self.optimizer, scheduler=self.scheduler,
                  keep_last=self.cfg.checkpoint.keep_last, ctx=self.ctx)

    def run(self, state: LoopState) -> LoopState:
        t = self.cfg.train
        tokens_per_step = t.global_batch_size * self.cfg.data.seq_length
        progress = Progress(t.train_iters, state.step, self.ctx.is_logging_rank and
                            self.cfg.logger.progress_bar)
        it = self._iterators(lambda: self.data.train_iterator(state.consumed_samples))
        guard = NonFiniteGuard(t.max_nonfinite_steps, t.optimizer.lr)
        budget = TimeBudget.of(t)

        def finished() -> bool:
            return state.step >= t.train_iters or (budget is not None and
                                                  budget.spent(state.train_seconds))
        if budget is not None:
            budget.set_lr(self.scheduler, state.train_seconds)
        ran = 0
        try:
            with PreemptionFlag() as preempt:
                while not finished():
                    start = self.clock()
                    losses = self.train_step(it)
                    seconds = self.clock() - start
                    state.step += 1
                    ran += 1
                    state.consumed_samples += t.global_batch_size
                    losses["tokens_per_s"] = tokens_per_step / seconds
                    losses["consumed_tokens"] = state.consumed_samples * self.cfg.data.seq_length
                    if budget is not None:
                        state.train_seconds += agreed_seconds(seconds, self.ctx.device)
                        budget.set_lr(self.scheduler, state.train_seconds)
                        losses["lr"] = self.optimizer.param_groups[0]["lr"]
                        losses["train_seconds"] = state.train_seconds
                    last = finished()
                    state.last_losses = losses
                    guard.update(state.step, bool(losses["skipped"]), losses)
                    losses["skipped_steps"] = float(guard.total)
                    if t.eval_interval and state.step % t.eval_interval == 0 and not last:
                        state.last_valid = self.evaluate()
                        losses.update(state.last_valid)
                    if state.step % t.log_interval == 0 or last or guard.consecutive:
                        self.writer.log(state.step, losses)
                    guard.check()
                    progress.update(state.step, {k: losses[k] for k in self.step.loss_names})
                    interval = self.cfg.checkpoint.save_interval
                    if interval and state.step % interval == 0 and not last:
                        self.save(state)
                    if preempt.agreed(self.ctx.device):
                        self.save(state)
                        raise Requeue(f"saved step {state.step} to {self.checkpoint_root}")
                    if t.exit_after_iters and ran >= t.exit_after_iters and not last:
                        self.save(state)
                        return state
                state.budget_spent = state.step < t.train_iters
                state.last_valid = self.evaluate()
                self.writer.log(state.step, state.last_valid)
                self.save(state)
        finally:
            progress.close()
        return state
