"""The training stages: `minitron train` (LM loss: pretraining, teacher correction) and
`minitron distill` (a frozen teacher beside the student). One setup, two step objects."""

from pathlib import Path
from typing import Callable

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.loader import to_yaml
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.models.builder import build_model
from megatron_minitron.runtime.device import (choose_precision, resolve_attention_impl,
                                              resolve_transformer_impl)
from megatron_minitron.runtime.distributed import ParallelContext, initialize, teardown
from megatron_minitron.runtime.run_lock import hold_run_dir
from megatron_minitron.training.data_source import build_source, resolve_tokenizer
from megatron_minitron.training.lm_step import LMStep
from megatron_minitron.training.loop import LoopState
from megatron_minitron.training.session import adopt_model_config, build_trainer, find_start

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
        (Path(cfg.run.dir) / "config.yaml").write_text(to_yaml(cfg) + resolved)


def run_training(cfg: MinitronConfig, model_overridden: bool, step_factory: StepFactory
                 ) -> LoopState:
    ctx = initialize(cfg.parallel, cfg.runtime)
    try:
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
    finally:
        teardown()


def lm_step(cfg: MinitronConfig, ctx: ParallelContext):
    return lambda chunks: LMStep(ctx.device, fused=cfg.train.fused_lm_loss,
                                 num_microbatches=cfg.train.num_microbatches(ctx.dp_size))


def kd_step(cfg: MinitronConfig, ctx: ParallelContext):
    """Load the frozen teacher at the student's layout and return the KD step factory."""
    from megatron_minitron.distill.kd_step import KDStep
    from megatron_minitron.distill.pipeline import check_pairs_colocated

    d = cfg.distill
    if not d.teacher_checkpoint:
        raise ConfigError("distill.teacher_checkpoint", "no teacher given",
                          "set distill.teacher_checkpoint=CKPT (one of our checkpoints)")
    ckpt.verified(d.teacher_checkpoint, "distill.teacher_checkpoint", cfg.checkpoint.verify)
    header = ckpt.read_header(d.teacher_checkpoint)
    check_vocabularies(header, cfg)
    pp = cfg.parallel.pipeline_model_parallel_size
    if header.model.num_layers % pp:
        raise ConfigError("parallel.pipeline_model_parallel_size",
                          f"the teacher's {header.model.num_layers} layers do not split into "
                          f"{pp} stages", "use a pipeline size that divides both depths")
    if d.uses_hidden_states:
        if cfg.parallel.sequence_parallel:
            raise ConfigError("parallel.sequence_parallel", "hidden-state losses under sequence "
                              "parallelism are not built", "set parallel.sequence_parallel=false"
                              " or distill.hidden_loss=none")
        check_pairs_colocated([tuple(p) for p in d.layer_pairs], header.model.num_layers,
                              cfg.model.num_layers, pp)
    runtime = cfg.runtime
    if d.teacher_precision != "auto":
        import dataclasses

        runtime = dataclasses.replace(runtime, precision=d.teacher_precision)
    teacher = build_model(header.model, cfg.parallel, runtime, ctx.device)
    ckpt.load(d.teacher_checkpoint, teacher, field="distill.teacher_checkpoint",
              verify=cfg.checkpoint.verify)
    for t in teacher:
        t.eval().requires_grad_(False)
    return lambda chunks: KDStep(d, teacher[0], chunks[0], ctx.tp_group, cfg.model.vocab_size,
                                 ctx.device, seed=cfg.runtime.seed,
                                 num_microbatches=cfg.train.num_microbatches(ctx.dp_size))


def check_vocabularies(teacher: ckpt.CheckpointHeader, cfg: MinitronConfig) -> None:
    """Teacher and student must share a tokenizer; their embedding padding may differ (the
    logit loss then uses the common real vocabulary), except under TP, where differently padded
    vocabularies are sharded at different boundaries."""
    t, s = teacher.model, cfg.model
    student_tok = {}
    if cfg.checkpoint.load and ckpt.resolve(cfg.checkpoint.load) is not None:
        student_tok = ckpt.read_header(cfg.checkpoint.load).tokenizer
    ids = [tok.get("identity") or tok.get("sha256") for tok in (teacher.tokenizer, student_tok)]
    if t.vocab_size != s.vocab_size or (all(ids) and ids[0] != ids[1]):
        raise ConfigError("distill.teacher_checkpoint",
                          f"the teacher's tokenizer ({t.vocab_size} tokens, "
                          f"{teacher.tokenizer.get('path', '?')}) is not the student's "
                          f"({s.vocab_size} tokens)", "distill between models that share a "
                          "tokenizer (different tokenizers cannot be compared token by token)")
    if t.padded_vocab_size != s.padded_vocab_size and cfg.parallel.tensor_model_parallel_size > 1:
        raise ConfigError("model.make_vocab_size_divisible_by",
                          f"teacher {t.padded_vocab_size} and student {s.padded_vocab_size} "
                          "embedding rows shard at different boundaries under TP",
                          f"set model.make_vocab_size_divisible_by="
                          f"{t.make_vocab_size_divisible_by} for the student, or distill at "
                          "parallel.tensor_model_parallel_size=1")


def train_lm(cfg: MinitronConfig, model_overridden: bool = False) -> LoopState:
    return run_training(cfg, model_overridden, lm_step)


def distill(cfg: MinitronConfig, model_overridden: bool = False) -> LoopState:
    return run_training(cfg, model_overridden, kd_step)
