"""minitron cache-teacher distill.teacher_checkpoint=T [cache.mode=sampled cache.k=32 ...]:
the teacher's distributions over the distillation data, for `minitron distill
distill.teacher_cache=FOLDER` with no teacher in memory."""

from typing import List

from megatron_minitron.cli.preflight import check
from megatron_minitron.config.loader import load_config, override_list
from megatron_minitron.distill.cache_writer import write_cache


def main(overrides: List[str]) -> None:
    write_cache(check("cache-teacher", load_config(override_list(overrides))))
