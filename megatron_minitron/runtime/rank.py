"""Which process this is: the one answer to "am I rank 0?" for every stage and file writer."""

import os

import torch.distributed as dist


def global_rank() -> int:
    """torch.distributed's rank while a process group is up; else torchrun's RANK (so it reads
    the same before initialisation and after teardown); 0 in a plain process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def is_rank0() -> bool:
    """Global rank 0: the process that prints summaries and writes shared files."""
    return global_rank() == 0
