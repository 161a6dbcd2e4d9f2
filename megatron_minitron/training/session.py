"""Assemble a training run: which weights to start from, the model, optimizer and data."""

import dataclasses
from dataclasses import dataclass
from typing import Callable, Optional

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.models.builder import build_model
from megatron_minitron.runtime.distributed import ParallelContext
from megatron_minitron.training.loop import DataSource, LoopState, Step, Trainer
from megatron_minitron.training.metrics import MetricsWriter
from megatron_minitron.training.optimizer import (attach_schedule_hooks, build_optimizer,
                                                  use_fused_adamw, wrap_ddp)


TRAIN_SECONDS = "train_seconds"
"""Header extra of a run under train.time_budget_s: the seconds of steps it has spent."""


@dataclass
class StartPoint:
    """Where weights come from: a resumable run of ours, a checkpoint to fine-tune, or nothing."""

    resume: Optional[str] = None
    init: Optional[str] = None
    header: Optional[ckpt.CheckpointHeader] = None


def find_start(cfg: MinitronConfig) -> StartPoint:
    """Resuming this run's own checkpoints wins over checkpoint.load. The newest of them that
    verifies is resumed (a damaged one is named and skipped)."""
    own_field = "checkpoint.save" if cfg.checkpoint.save else "run.dir"
    own = ckpt.resolve_intact(cfg.checkpoint_root, own_field, cfg.checkpoint.verify)
    if own is not None:
        return StartPoint(resume=str(own), header=ckpt.read_header(str(own)))
    if cfg.checkpoint.load:
        ckpt.verified(cfg.checkpoint.load, "checkpoint.load", cfg.checkpoint.verify)
        header = ckpt.read_header(cfg.checkpoint.load)
        if not cfg.checkpoint.finetune:  # continue its run: step, samples, optimizer, schedule
            return StartPoint(resume=str(ckpt.resolve(cfg.checkpoint.load)), header=header)
        return StartPoint(init=cfg.checkpoint.load, header=header)
    return StartPoint()


def adopt_model_config(cfg: MinitronConfig, start: StartPoint, model_overridden: bool
                       ) -> MinitronConfig:
    """A checkpoint carries its architecture. An explicit, different one on the command line is
    a mistake we report instead of loading mismatched weights."""
    if start.header is None:
        return cfg
    saved = start.header.model
    if model_overridden and saved != cfg.model:
        diff = [f.name for f in dataclasses.fields(ModelConfig)
                if getattr(saved, f.name) != getattr(cfg.model, f.name)]
        raise ConfigError(f"model.{diff[0]}",
                          f"the checkpoint {start.resume or start.init} was saved with "
                          f"{diff[0]}={getattr(saved, diff[0])!r}, the config says "
                          f"{getattr(cfg.model, diff[0])!r}",
                          "drop the model overrides; checkpoints carry their own architecture")
    new = dataclasses.replace(cfg, model=saved)
    new.validate_layout()
    return new


def build_trainer(cfg: MinitronConfig, ctx: ParallelContext, start: StartPoint,
                  make_step: Callable[[list], Step], data: DataSource, tokenizer_info: dict,
                  config_dict: Optional[dict] = None) -> "tuple[Trainer, LoopState]":
    """Model chunks (DDP), optimizer, schedule and state, loaded from `start`.

    Order matters: initial weights load into the bare model, then the step is built (it may
    attach modules of its own to the chunks, like the distillation projections, which an
    initial checkpoint does not have), then DDP and the optimizer see every parameter (bf16
    main params are copied from loaded weights), then a resume restores all of it."""
    raw = build_model(cfg.model, cfg.parallel, cfg.runtime, ctx.device)
    carried = {}  # what the exported model needs to know of its HF origin (Phi-3's layout...)
    if start.init:
        carried = ckpt.carried_extra(ckpt.load(start.init, raw, ctx=ctx,
                                               verify=cfg.checkpoint.verify))
    step = make_step(raw)
    chunks = wrap_ddp(raw)
    optimizer, scheduler = build_optimizer(chunks, cfg.train.optimizer, cfg.train)
    attach_schedule_hooks(chunks, optimizer)
    state = LoopState()
    if start.resume:
        h = ckpt.load(start.resume, chunks, optimizer=optimizer, scheduler=scheduler, ctx=ctx,
                      field="checkpoint.save" if cfg.checkpoint.save else "run.dir",
                      verify=cfg.checkpoint.verify)
        use_fused_adamw(optimizer)  # the loaded param_groups carry the saver's choice
        state = LoopState(step=h.step, consumed_samples=h.consumed_samples,
                          train_seconds=float(h.extra.get(TRAIN_SECONDS, 0.0)))
        carried = ckpt.carried_extra(h) or carried
    writer = MetricsWriter(cfg.run.dir, cfg.logger, ctx.rank == 0, config_dict,
                           resume_step=state.step)

    def make_header(s: LoopState) -> ckpt.CheckpointHeader:
        extra = dict(carried)
        if cfg.train.time_budget_s:  # a resumed run continues the same budget
            extra[TRAIN_SECONDS] = s.train_seconds
        return ckpt.CheckpointHeader(model=cfg.model, tokenizer=tokenizer_info, step=s.step,
                                     consumed_samples=s.consumed_samples, extra=extra)

    trainer = Trainer(cfg, ctx, chunks, step, optimizer, scheduler, data, writer,
                      make_header)
    return trainer, state

