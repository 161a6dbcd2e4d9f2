"""`minitron convert convert.direction=hf_to_mcore convert.input=HF_DIR convert.output=CKPT`."""

from dataclasses import dataclass, field
from typing import List

from omegaconf import OmegaConf

from megatron_minitron.config.convert import ConvertConfig
from megatron_minitron.config.loader import compose, override_list, to_typed


@dataclass
class _ConvertSection:
    """Until MinitronConfig has a `convert` section, its overrides are parsed here."""

    convert: ConvertConfig = field(default_factory=ConvertConfig)
    """The conversion."""


def load_convert_config(overrides: List[str]) -> ConvertConfig:
    overrides = override_list(overrides)
    ours = [o for o in overrides if o.lstrip("+").startswith("convert.")]
    compose([o for o in overrides if o not in ours])  # the rest must still be valid overrides
    return to_typed(OmegaConf.from_dotlist([o.lstrip("+") for o in ours]), _ConvertSection).convert


def main(overrides: List[str]) -> None:
    cfg = load_convert_config(overrides)
    cfg.check_paths()
    from megatron_minitron.checkpoint import hf

    if cfg.direction == "hf_to_mcore":
        src = cfg.input
        if src == "smollm2":
            from megatron_minitron.checkpoint.smollm2 import fetch_smollm2

            src = str(fetch_smollm2())
        path = hf.hf_to_mcore(src, cfg.output)
    else:
        model_type = None if cfg.model_type == "auto" else cfg.model_type
        path = hf.mcore_to_hf(cfg.input, cfg.output, dtype=cfg.dtype, model_type=model_type)
    print(f"minitron convert: wrote {path}")
