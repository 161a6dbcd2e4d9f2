"""Is a checkpoint worth starting on? The cheap checks a stage makes before any work: header,
common state and shard index, each failure naming the config field that gave the path."""

from megatron_minitron.checkpoint.dist import CheckpointHeader, read_header, resolve
from megatron_minitron.config.errors import ConfigError

COMMON = "common.pt"
"""dist_checkpointing's non-sharded state (a small pickle)."""
INDEX = ".metadata"
"""torch.distributed.checkpoint's index of the shards."""


def check_readable(path: str, field: str) -> CheckpointHeader:
    """The header of the checkpoint at `path`; ConfigError(field, ...) if it cannot load."""
    import torch

    header = read_header(path, field)
    step = resolve(path)
    fix = "point to an intact checkpoint (or its previous step_* folder)"
    if not (step / INDEX).is_file():
        raise ConfigError(field, f"{step} has no shard index {INDEX}", fix)
    common = step / COMMON
    if not common.is_file() or common.stat().st_size == 0:
        raise ConfigError(field, f"{common} is missing or empty", fix)
    try:
        torch.load(common, map_location="cpu", weights_only=False)
    except Exception as e:  # a damaged pickle raises whatever its bytes lead to
        raise ConfigError(field, f"{common} does not load ({type(e).__name__})", fix) from e
    return header
