"""minitron distill distill.teacher_checkpoint=T checkpoint.load=STUDENT [overrides]."""

from typing import List

from megatron_minitron.cli.preflight import check
from megatron_minitron.config.loader import load_config, override_list
from megatron_minitron.training.lm import distill


def main(overrides: List[str]) -> None:
    overrides = override_list(overrides)
    cfg = check("distill", load_config(overrides))
    distill(cfg, any(o.lstrip("+~").startswith("model") for o in overrides))
