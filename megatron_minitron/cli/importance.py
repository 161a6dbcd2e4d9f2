"""`minitron importance [key=value ...]`: score a checkpoint's heads, groups, neurons, channels
and layers on calibration data (or with a data-free baseline); rank 0 writes the scores file."""

from typing import List

from megatron_minitron.cli.preflight import check
from megatron_minitron.config.loader import load_config, override_list


def main(overrides: List[str]) -> None:
    cfg = check("importance", load_config(override_list(overrides)))
    from megatron_minitron.checkpoint.dist import verified
    from megatron_minitron.pipeline.stages import score
    from megatron_minitron.runtime.rank import global_rank, is_rank0
    from megatron_minitron.runtime.run_lock import hold_run_dir

    checkpoint = cfg.importance_checkpoint  # preflight: one is set
    verified(checkpoint, "importance.checkpoint" if cfg.importance.checkpoint else
             "checkpoint.load", cfg.checkpoint.verify)
    output = cfg.importance_output
    with hold_run_dir(cfg.run.dir, global_rank()):
        score(cfg, checkpoint, output)
    if is_rank0():
        print(f"minitron importance: wrote {output}")
