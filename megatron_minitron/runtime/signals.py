"""Pre-emption: Slurm sends SIGUSR1/SIGTERM before the time limit; we save and ask to requeue."""

import os
import signal
from pathlib import Path

import torch
import torch.distributed as dist


class Requeue(Exception):
    """A signal-triggered checkpoint was written; the launcher should requeue the job."""


REQUEUE_FILE_ENV = "MINITRON_REQUEUE_FILE"
"""Set by launch/torchrun.sh: torchrun reports every worker failure as exit 1, so a worker that
saved and wants a requeue also says so in this file."""


def announce_requeue(reason: str) -> None:
    """Tell the launcher (if it asked, via REQUEUE_FILE_ENV) that this rank saved and stopped."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if path:
        Path(path).write_text(reason + "\n")


class PreemptionFlag:
    """Records SIGUSR1 / SIGTERM; `agreed` makes every rank stop at the same step."""

    def __init__(self):
        self.raised = False
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            try:
                signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding program)
                pass

    def _handle(self, signum, frame):
        self.raised = True

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
