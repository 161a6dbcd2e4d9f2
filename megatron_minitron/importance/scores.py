"""The scores file: safetensors tensors + a JSON header (safetensors metadata key "minitron").

Tensors (global order, layer rows 0-based = layer_number - 1; higher means more important):
  mlp.neurons                  [num_layers, ffn_hidden_size]
  attention.heads              [num_layers, num_attention_heads]
  attention.query_groups       [num_layers, num_query_groups]  (sum of the group's head scores)
  embedding.channels           [hidden_size]                   (sum over every norm's output)
  embedding.channels_per_norm  [2 * num_layers + 1, hidden_size]
  layers.cosine                [num_layers]                    1 - mean cosine(in, out)
  layers.loss                  [num_layers]                    LM-loss increase, layer skipped
  blocks.loss.k<k>             [num_layers - k + 1]            same, layers i+1..i+k skipped
The header ties the scores to the model they were measured on (model_config_hash) and names
their source (activation, or the magnitude / random baselines of baselines.py).
"""

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig

META_KEY = "minitron"
FORMAT_VERSION = 1


def model_config_hash(model: ModelConfig) -> str:
    """sha256 of the model config as a sorted JSON dict."""
    text = json.dumps(dataclasses.asdict(model), sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


@dataclasses.dataclass
class ScoresHeader:
    """What the scores were measured on and how."""

    model_config_hash: str
    """model_config_hash() of the scored model."""
    model: Dict[str, Any]
    """The scored model's config, for humans and for error messages."""
    num_samples: int
    """Calibration sequences the width and cosine scores saw (over all DP ranks)."""
    seq_aggregation: str
    """Reduction over each sample's tokens."""
    sample_aggregation: str
    """Reduction over samples."""
    data: Dict[str, Any] = dataclasses.field(default_factory=dict)
    """Description of the calibration data (datasets, split, seq_length, tokenizer...)."""
    base_loss: Optional[float] = None
    """Mean LM loss of the unmodified model on the calibration data, when depth_loss ran."""
    block_sizes: List[int] = dataclasses.field(default_factory=list)
    """Block sizes k with blocks.loss.k<k> tensors."""
    layout: Dict[str, int] = dataclasses.field(default_factory=dict)
    """TP/PP/DP that computed the scores (informational: scores do not depend on it)."""
    source: str = "activation"
    """importance.source: "activation", or the "magnitude" / "random" baseline."""
    version: int = FORMAT_VERSION
    """Scores file format version."""


@dataclasses.dataclass
class Scores:
    tensors: Dict[str, torch.Tensor]
    header: ScoresHeader

    def get(self, name: str, field: str = "prune.scores") -> torch.Tensor:
        if name not in self.tensors:
            fix = ("use activation or random scores, or prune.depth_mode=list" if
                   self.header.source == "magnitude" else
                   "rerun `minitron importance` with that score enabled")
            raise ConfigError(field, f"the {self.header.source} scores file has no {name!r} "
                              f"(it has {sorted(self.tensors)})", fix)
        return self.tensors[name]

    def block_loss(self, k: int, field: str = "prune.depth_mode") -> torch.Tensor:
        if k not in self.header.block_sizes:
            fix = ("magnitude scores rank no layers: use activation or random scores, or "
                   "depth_mode=list" if self.header.source == "magnitude" else
                   f"rerun importance with importance.block_sizes=[{k}] or use "
                   "depth_mode=score")
            raise ConfigError(field, f"no block scores for blocks of {k} layers (have "
                              f"{self.header.block_sizes})", fix)
        return self.tensors[f"blocks.loss.k{k}"]

    def check_model(self, model: ModelConfig, field: str = "prune.scores") -> None:
        """Raise unless these scores were measured on exactly this model config."""
        got = model_config_hash(model)
        if got != self.header.model_config_hash:
            raise ConfigError(field, f"scores were computed for model config hash "
                              f"{self.header.model_config_hash[:12]} ({self.header.model}) but "
                              f"the checkpoint's is {got[:12]}",
                              "rerun `minitron importance` on this checkpoint")


def save_scores(path: str, scores: Scores) -> Path:
    from safetensors.torch import save_file

    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().float().contiguous().cpu() for k, v in scores.tensors.items()}
    meta = {META_KEY: json.dumps(dataclasses.asdict(scores.header), sort_keys=True)}
    tmp = p.with_name(p.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(p)
    return p


def load_scores(path: str, field: str = "prune.scores") -> Scores:
    from safetensors import safe_open

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(field, f"no scores file at {p}", "run `minitron importance` first")
    try:
        with safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
            if META_KEY not in meta:
                raise ConfigError(field, f"{p} has no {META_KEY!r} header",
                                  "use a file written by `minitron importance`")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        header = ScoresHeader(**json.loads(meta[META_KEY]))
    except ConfigError:
        raise
    except Exception as e:  # safetensors' own error type, JSON or header fields: all damage
        raise ConfigError(field, f"{p} is not a readable scores file ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''})",
                          "rerun `minitron importance` to write it again") from e
    if header.version != FORMAT_VERSION:
        raise ConfigError(field, f"scores format version {header.version}, expected "
                          f"{FORMAT_VERSION}", "rerun `minitron importance`")
    return Scores(tensors, header)
