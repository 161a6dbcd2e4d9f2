"""`minitron distill distill.teacher_cache=PATH`: distillation from a teacher cache, with no
teacher model built or loaded (the step factory run_training takes, like lm.kd_step)."""

from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.runtime.distributed import ParallelContext


def open_cache(cfg: MinitronConfig, tok=None):
    """The cache distill.teacher_cache names, refused (ConfigError naming the field) when it
    was built for another teacher, other data or other settings. tok None: the data check
    waits for the run (the tokenizer may come from the student's checkpoint)."""
    from megatron_minitron.distill.cache_header import check_for_distill, data_hash
    from megatron_minitron.distill.teacher_cache import TeacherCache

    cache = TeacherCache(cfg.distill.teacher_cache)
    check_for_distill(cache.header, cfg, cfg.distill.teacher_cache,
                      None if tok is None else data_hash(cfg, tok))
    cache.estimator(cfg.distill.teacher_cache_estimator)
    return cache


def cached_kd_step(cfg: MinitronConfig, ctx: ParallelContext):
    from megatron_minitron.distill.cached_step import CachedKDStep
    from megatron_minitron.training.data_source import resolve_tokenizer
    from megatron_minitron.training.session import find_start

    cache = open_cache(cfg, resolve_tokenizer(cfg, find_start(cfg).header))
    return lambda chunks: CachedKDStep(cfg.distill, cache, chunks[0], ctx.tp_group,
                                       cfg.model.vocab_size, ctx.device,
                                       num_microbatches=cfg.train.num_microbatches(ctx.dp_size))
