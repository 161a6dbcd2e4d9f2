"""Depth pruning: which layers survive, and renumbering the survivors' state-dict keys."""

from typing import Dict, List, Optional

import torch

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.prune import PruneConfig
from megatron_minitron.importance.scores import Scores
from megatron_minitron.models.layers import LAYER_KEY, layer_key


def select_layers(src: ModelConfig, num_layers: int, scores: Optional[Scores],
                  cfg: PruneConfig) -> List[int]:
    """Kept source layer numbers (1-based, sorted)."""
    L = src.num_layers
    if cfg.depth_mode == "list":
        bad = [n for n in cfg.drop_layers if not 1 <= n <= L]
        if bad or len(set(cfg.drop_layers)) != len(cfg.drop_layers):
            raise ConfigError("prune.drop_layers", f"{cfg.drop_layers} has repeats or numbers "
                              f"outside 1..{L}", f"list distinct layer numbers in 1..{L}")
        return [n for n in range(1, L + 1) if n not in set(cfg.drop_layers)]
    if num_layers == L:
        return list(range(1, L + 1))
    if scores is None:
        raise ConfigError("prune.scores", "depth pruning by score needs importance scores",
                          "run `minitron importance` or use depth_mode=list")
    drop = L - num_layers
    if cfg.depth_mode == "block":
        block = scores.block_loss(drop)
        start = int(torch.argsort(block.double(), stable=True)[0]) + 1
        return [n for n in range(1, L + 1) if not start <= n < start + drop]
    name = "layers.loss" if cfg.depth_metric == "loss" else "layers.cosine"
    order = torch.argsort(-scores.get(name, "prune.depth_metric").double(), stable=True)
    return sorted(int(i) + 1 for i in order[:num_layers])


def renumber(state: Dict[str, torch.Tensor], layers: List[int]) -> Dict[str, torch.Tensor]:
    """Keep the keys of `layers` (source numbers, 1-based) as decoder.layers.0, 1, ...; drop the
    other layers' keys; leave non-layer keys alone."""
    new_index = {n - 1: i for i, n in enumerate(layers)}
    out = {}
    for key, value in state.items():
        m = LAYER_KEY.match(key)
        if m is None:
            out[key] = value
        elif int(m.group(1)) in new_index:
            out[layer_key(new_index[int(m.group(1))], m.group(2))] = value
    return out
