"""`minitron importance [key=value ...]`: score a checkpoint's heads, groups, neurons, channels
and layers on calibration data (or with a data-free baseline); rank 0 writes the scores file."""

import os
from typing import List

from megatron_minitron.cli.preflight import check
from megatron_minitron.config.loader import load_config, override_list


def main(overrides: List[str]) -> None:
    cfg = check("importance", load_config(override_list(overrides)))
    from megatron_minitron.pipeline.stages import score

    checkpoint = cfg.importance.checkpoint or cfg.checkpoint.load  # preflight: one is set
    output = cfg.importance.output or f"{cfg.run.dir}/importance/scores.safetensors"
    score(cfg, checkpoint, output)
    if os.environ.get("RANK", "0") == "0":
        print(f"minitron importance: wrote {output}")
