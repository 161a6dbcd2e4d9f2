"""`minitron prune [key=value ...]`: slice a checkpoint to prune.target (or prune.param_budget)
using an importance scores file; writes a new checkpoint that loads at any TP/PP it fits."""

from pathlib import Path
from typing import List

from megatron_minitron.cli.preflight import check
from megatron_minitron.config.loader import load_config, override_list


def main(overrides: List[str]) -> None:
    overrides = override_list(overrides)
    cfg = check("prune", load_config(overrides))
    from megatron_minitron.checkpoint.dist import verified
    from megatron_minitron.pipeline.stages import prune
    from megatron_minitron.runtime.rank import global_rank, is_rank0
    from megatron_minitron.runtime.run_lock import hold_run_dir

    checkpoint = cfg.prune_checkpoint  # preflight: one is set
    verified(checkpoint, "prune.checkpoint" if cfg.prune.checkpoint else "checkpoint.load",
             cfg.checkpoint.verify)
    scores = cfg.prune_scores
    if cfg.prune.scores is None and not Path(scores).is_file():
        scores = None  # fine while no axis is ranked; the plan says so otherwise
    with hold_run_dir(cfg.run.dir, global_rank()):
        path = prune(cfg, checkpoint, scores, cfg.prune_output)
    if is_rank0():
        print(f"minitron prune: wrote {path['checkpoint']}")
