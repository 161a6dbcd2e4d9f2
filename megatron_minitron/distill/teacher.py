"""The frozen teacher: its checkpoint checked against the student's config (tokenizer,
padded vocabulary, depth per pipeline stage, hidden-state pairs) and built at the student's
layout."""

import dataclasses
from typing import List

import torch

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.distill.pipeline_parallel import check_pairs_colocated
from megatron_minitron.models.builder import build_model


def build_teacher(cfg: MinitronConfig, ctx) -> List[torch.nn.Module]:
    """The teacher's chunks for this rank, loaded from distill.teacher_checkpoint, in eval mode
    with no gradients (at distill.teacher_precision unless "auto")."""
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
        runtime = dataclasses.replace(runtime, precision=d.teacher_precision)
    teacher = build_model(header.model, cfg.parallel, runtime, ctx.device)
    ckpt.load(d.teacher_checkpoint, teacher, field="distill.teacher_checkpoint",
              verify=cfg.checkpoint.verify)
    for t in teacher:
        t.eval().requires_grad_(False)
    return teacher


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
