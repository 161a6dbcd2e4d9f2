"""A deterministic in-memory data source for loop tests: sample i is a function of i alone."""

import torch


def sample(i: int, seq_length: int, vocab: int):
    g = torch.Generator().manual_seed(1000 + i)
    ids = torch.randint(0, vocab, (seq_length + 1,), generator=g)
    return ids


class SyntheticSource:
    """Megatron sampler order: global samples in order, DP rank r takes its mbs-slice."""

    def __init__(self, seq_length, vocab, micro_batch_size, dp_rank, dp_size, valid_offset=10**6):
        self.s, self.v, self.mbs = seq_length, vocab, micro_batch_size
        self.dp_rank, self.dp_size, self.valid_offset = dp_rank, dp_size, valid_offset

    def _iter(self, start):
        i = start
        while True:
            first = i + self.dp_rank * self.mbs
            ids = torch.stack([sample(first + k, self.s, self.v) for k in range(self.mbs)])
            yield {"tokens": ids[:, :-1], "labels": ids[:, 1:],
                   "loss_mask": torch.ones(self.mbs, self.s),
                   "position_ids": torch.arange(self.s).expand(self.mbs, -1).contiguous()}
            i += self.mbs * self.dp_size

    def train_iterator(self, consumed_samples):
        return self._iter(consumed_samples)

    def valid_iterator(self):
        return self._iter(self.valid_offset)
