"""The training stages: `minitron train` (LM loss: pretraining, teacher correction) and
`minitron distill` (a frozen teacher beside the student). One setup, two step objects."""

from pathlib import Path
from typing import Callable

from megatron_minitron.config.loader import to_yaml
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.runtime.device import (choose_precision, resolve_attention_impl,
                                              resolve_transformer_impl)
from megatron_minitron.runtime.distributed import ParallelContext, process_groups
from megatron_minitron.runtime.run_lock import hold_run_dir
from megatron_minitron.training.data_source import build_source, resolve_tokenizer
from megatron_minitron.training.lm_step import LMStep
from megatron_minitron.training.loop import LoopState
from megatron_minitron.training.session import adopt_model_config, build_trainer, find_start
from megatron_minitron.runtime import atomic_files

StepFactory = Callable[[MinitronConfig, ParallelContext], Callable[[list], object]]


def write_resolved_config(cfg: MinitronConfig, rank: int) -> None:
    """The stage's config, with what "auto" settings resolved to on this machine and why."""
    if rank == 0:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        choice = choose_precision(cfg.runtime)
        resolved = to_yaml({"resolved": {"precision": choice.precision,
                                         "precision_reason": choice.reason,
                                         "transformer_impl": resolve_transformer_impl(cfg.runtime),
                                         "attention_impl": resolve_attention_impl(cfg.runtime)}})
        atomic_files.write_text(Path(cfg.run.dir) / "config.yaml", to_yaml(cfg) + resolved)


def run_training(cfg: MinitronConfig, model_overridden: bool, step_factory: StepFactory
                 ) -> LoopState:
    with process_groups(cfg.parallel, cfg.runtime) as ctx:
        cfg.train.num_microbatches(ctx.dp_size)  # every check before the run dir is written
        with hold_run_dir(cfg.run.dir, ctx.rank):
            start = find_start(cfg)
            cfg = adopt_model_config(cfg, start, model_overridden)
            tok = resolve_tokenizer(cfg, start.header)
            make_step = step_factory(cfg, ctx)
            data = build_source(cfg, ctx, tok)
            write_resolved_config(cfg, ctx.rank)
            trainer, state = build_trainer(cfg, ctx, start, make_step, data, tok.describe())
            state = trainer.run(state)
            trainer.writer.close()
            return state


def lm_step(cfg: MinitronConfig, ctx: ParallelContext):
    return lambda chunks: LMStep(ctx.device, fused=cfg.train.fused_lm_loss,
                                 num_microbatches=cfg.train.num_microbatches(ctx.dp_size))


def kd_step(cfg: MinitronConfig, ctx: ParallelContext):
    """Load the frozen teacher at the student's layout and return the KD step factory."""
    from megatron_minitron.distill.kd_step import KDStep
    from megatron_minitron.distill.teacher import build_teacher

    d, teacher = cfg.distill, build_teacher(cfg, ctx)
    return lambda chunks: KDStep(d, teacher[0], chunks[0], ctx.tp_group, cfg.model.vocab_size,
                                 ctx.device, seed=cfg.runtime.seed,
                                 num_microbatches=cfg.train.num_microbatches(ctx.dp_size))


def train_lm(cfg: MinitronConfig, model_overridden: bool = False) -> LoopState:
    return run_training(cfg, model_overridden, lm_step)


def distill(cfg: MinitronConfig, model_overridden: bool = False) -> LoopState:
    """From the teacher model, or from its cache (distill.teacher_cache) with no teacher."""
    if cfg.distill.teacher_cache:
        from megatron_minitron.training.cached_distill import cached_kd_step

        return run_training(cfg, model_overridden, cached_kd_step)
    return run_training(cfg, model_overridden, kd_step)
