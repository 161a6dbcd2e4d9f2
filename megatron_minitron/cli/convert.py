"""`minitron convert convert.direction=hf_to_mcore convert.input=HF_DIR convert.output=CKPT`."""

from pathlib import Path
from typing import List

from megatron_minitron.cli.preflight import check
from megatron_minitron.config.loader import load_config, override_list
from megatron_minitron.config.schema import MinitronConfig


def load_convert_config(overrides: List[str]) -> MinitronConfig:
    """The composed config, checked for `minitron convert` (its convert section, run.dir and
    logger.verbose are what the stage reads)."""
    return check("convert", load_config(override_list(overrides)))


def main(overrides: List[str]) -> None:
    root = load_convert_config(overrides)
    cfg = root.convert
    from megatron_minitron.checkpoint import embedded, hf
    from megatron_minitron.runtime.console import foreign_output

    if cfg.direction == "hf_to_mcore":
        src = cfg.input
        # transformers' GGUF and weight-loading bars: to run.dir/stage.log
        with foreign_output(Path(root.run.dir) / "stage.log", root.logger.verbose):
            if embedded.is_embedded(src):
                src = str(embedded.fetch(src))
            path = hf.hf_to_mcore(src, cfg.output)
    else:
        from megatron_minitron.checkpoint.dist import verified

        verified(cfg.input, "convert.input")
        model_type = None if cfg.model_type == "auto" else cfg.model_type
        path = hf.mcore_to_hf(cfg.input, cfg.output, dtype=cfg.dtype, model_type=model_type)
    print(f"minitron convert: wrote {path}")
