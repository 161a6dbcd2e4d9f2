"""`minitron prune [key=value ...]`: slice a checkpoint to prune.target (or prune.param_budget)
using an importance scores file; writes a new checkpoint that loads at any TP/PP it fits."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from omegaconf import OmegaConf

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.loader import compose, override_list, to_typed
from megatron_minitron.config.parallel import ParallelConfig
from megatron_minitron.config.prune import PruneConfig


@dataclass
class _Section:
    """Until MinitronConfig has a `prune` section, its overrides are parsed here."""

    prune: PruneConfig = field(default_factory=PruneConfig)
    """Pruning."""


def main(overrides: List[str]) -> None:
    overrides = override_list(overrides)
    ours = [o for o in overrides if o.lstrip("+").startswith("prune.")]
    cfg = to_typed(compose([o for o in overrides if o not in ours]))
    prune = to_typed(OmegaConf.from_dotlist([o.lstrip("+") for o in ours]), _Section).prune
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
