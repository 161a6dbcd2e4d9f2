"""The vocabulary shards of the vocab-parallel losses: which ids each TP rank holds (the
collectives that combine them are runtime/collectives.py's)."""

from typing import Optional, Tuple


def vocab_range(tp_rank: int, local_size: int) -> Tuple[int, int]:
    """Global [start, end) vocabulary ids of this rank's contiguous shard (megatron's layout)."""
    return tp_rank * local_size, (tp_rank + 1) * local_size


def real_columns(tp_rank: int, local_size: int, real_vocab_size: Optional[int]) -> int:
    """How many leading columns of this rank's shard are real tokens (the rest is padding)."""
    if real_vocab_size is None:
        return local_size
    start, _ = vocab_range(tp_rank, local_size)
    return max(0, min(local_size, real_vocab_size - start))
