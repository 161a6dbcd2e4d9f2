"""`minitron prune [key=value ...]`: slice a checkpoint to prune.target (or prune.param_budget)
using an importance scores file; writes a new checkpoint that loads at any TP/PP it fits."""

from pathlib import Path
from typing import List

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.loader import load_config, override_list
from megatron_minitron.config.parallel import ParallelConfig


def main(overrides: List[str]) -> None:
    overrides = override_list(overrides)
    cfg = load_config(overrides)
    prune = cfg.prune
    from megatron_minitron.pruning.slicing import prune_checkpoint
    from megatron_minitron.runtime.distributed import initialize, teardown

    checkpoint = prune.checkpoint or cfg.checkpoint.load
    if checkpoint is None:
        raise ConfigError("prune.checkpoint", "no checkpoint to prune",
                          "set prune.checkpoint or checkpoint.load")
    scores = prune.scores or f"{cfg.run.dir}/importance/scores.safetensors"
    if prune.scores is None and not Path(scores).is_file():
        scores = None  # fine while no axis is ranked; the plan says so otherwise
    output = prune.output or f"{cfg.run.dir}/pruned"
    ctx = initialize(ParallelConfig(), cfg.runtime)  # one full copy: TP=1, PP=1
    try:
        path = prune_checkpoint(checkpoint, scores, prune, output, ctx, cfg.runtime)
        if ctx.rank == 0:
            print(f"minitron prune: wrote {path}")
    finally:
        teardown()
