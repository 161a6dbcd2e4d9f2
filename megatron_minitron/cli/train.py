"""minitron train [overrides]: pretrain, or fine-tune a checkpoint (teacher correction)."""

from typing import List

from megatron_minitron.cli.preflight import check
from megatron_minitron.config.loader import load_config, override_list
from megatron_minitron.training.lm import train_lm


def main(overrides: List[str]) -> None:
    overrides = override_list(overrides)
    cfg = check("train", load_config(overrides))
    model_overridden = any(o.lstrip("+~").startswith("model") for o in overrides)
    train_lm(cfg, model_overridden)
