"""Deterministic, resumable micro-batches for one data-parallel rank.

Megatron-LM's MegatronPretrainingSampler order: the global sample order is the dataset's own
(GPTDataset is already shuffled by its seed); samples are taken in groups of
micro_batch_size * dp_size, and DP rank r takes the r-th block of micro_batch_size in each group.
Resuming at consumed_samples=N continues exactly where a run that consumed N samples stopped.
"""

from typing import Dict, Iterator, List, Optional

import torch
from torch.utils.data import DataLoader

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.data.sample_keys import SAMPLE_KEY

BATCH_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


class PretrainingSampler:
    """Index lists of one micro-batch for one DP rank, from consumed_samples on.

    cyclic: wrap around the dataset instead of stopping (validation iterators).
    limit: stop after this many global samples (calibration); a final partial group is then
    shared out in micro_batch_size blocks, so the last ranks may get less or nothing."""

    def __init__(self, total_samples: int, consumed_samples: int, micro_batch_size: int,
                 dp_rank: int = 0, dp_size: int = 1, cyclic: bool = False,
                 limit: Optional[int] = None):
        if total_samples < 1:
            raise ValueError("empty dataset")
        if micro_batch_size < 1 or dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"bad micro_batch_size={micro_batch_size}, "
                             f"dp_rank={dp_rank}, dp_size={dp_size}")
        if consumed_samples < 0:
            raise ValueError(f"consumed_samples={consumed_samples} < 0")
        self.total, self.consumed, self.mbs = total_samples, consumed_samples, micro_batch_size
        self.dp_rank, self.dp_size, self.cyclic, self.limit = dp_rank, dp_size, cyclic, limit

    def __iter__(self) -> Iterator[List[int]]:
        group = self.mbs * self.dp_size
        end = self.limit if self.limit is not None else (None if self.cyclic else self.total)
        start = self.consumed
        while end is None or start < end:
            if end is not None and start + group > end and self.limit is None:
                return  # drop_last, as Megatron's sampler
            lo = start + self.dp_rank * self.mbs
            hi = lo + self.mbs if end is None else min(lo + self.mbs, end)
            if hi > lo:
                yield [i % self.total for i in range(lo, hi)]
            start += group

    def __len__(self) -> int:
        if self.limit is None and self.cyclic:
            raise TypeError("a cyclic sampler has no length")
        return sum(1 for _ in self)


def _loader(dataset, sampler: PretrainingSampler, num_workers: int) -> Iterator[Dict]:
    loader = DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers,
                        pin_memory=torch.cuda.is_available(),
                        persistent_workers=num_workers > 0)
    for batch in loader:
        # [b, s] each; megatron's attention_mask (if any) is dropped: attention is causal.
        # KeyedSamples' sample_key [b, 2] passes through (teacher caches are read by it).
        yield {k: batch[k] for k in BATCH_KEYS + (SAMPLE_KEY,) if k in batch}


def build_iterator(dataset, micro_batch_size: int, dp_rank: int = 0, dp_size: int = 1,
                   consumed_samples: int = 0, cyclic: bool = False,
                   num_workers: int = 0) -> Iterator[Dict[str, torch.Tensor]]:
    """Batches {tokens, labels, position_ids: long [b, s]; loss_mask: float [b, s]} for this DP
    rank. consumed_samples counts global samples (all DP ranks), as Megatron's does."""
    if not cyclic and consumed_samples > len(dataset):
        raise ConfigError("train.train_iters", f"resuming after {consumed_samples} samples but "
                          f"the dataset has only {len(dataset)}",
                          "rebuild the datasets for the resumed run's training plan")
    sampler = PretrainingSampler(len(dataset), consumed_samples, micro_batch_size, dp_rank,
                                 dp_size, cyclic=cyclic)
    return _loader(dataset, sampler, num_workers)


def calibration_batches(dataset, num_samples: int, micro_batch_size: int, dp_rank: int = 0,
                        dp_size: int = 1, field: str = "importance.num_samples"
                        ) -> Iterator[Dict[str, torch.Tensor]]:
    """This DP rank's share of the first num_samples samples of a split (importance
    estimation), in micro-batches; the ranks' shares are disjoint and cover all of them."""
    if dataset is None or len(dataset) == 0:
        raise ConfigError("data.split", "the calibration split is empty",
                          "give the split a non-zero share")
    if not 1 <= num_samples <= len(dataset):
        raise ConfigError(field, f"{num_samples} calibration samples, the split has "
                          f"{len(dataset)}", f"use 1..{len(dataset)}")
    sampler = PretrainingSampler(len(dataset), 0, micro_batch_size, dp_rank, dp_size,
                                 limit=num_samples)
    return _loader(dataset, sampler, 0)
