"""Datasets whose samples say which sample they are: the key a teacher cache is read by."""

import torch

SAMPLE_KEY = "sample_key"
"""Batch key of a long `[b, 2]` tensor: (split id, global sample index) per row."""
SPLIT_IDS = {"train": 0, "valid": 1}


class KeyedSamples(torch.utils.data.Dataset):
    """`dataset`'s samples with `sample_key` = (split_id, index) added."""

    def __init__(self, dataset, split_id: int):
        self.dataset, self.split_id = dataset, split_id

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        item = dict(self.dataset[index])
        item[SAMPLE_KEY] = torch.tensor([self.split_id, int(index)], dtype=torch.long)
        return item
