"""Pre-emption: Slurm sends SIGUSR1/SIGTERM before the time limit; we save and ask to requeue."""

import os
import signal
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_minitron.runtime import atomic_files


EXIT_REQUEUE = 3
"""A pre-empted job saved a checkpoint and asks its launcher to requeue it (launch/slurm)."""


def is_logging_process() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


class Requeue(Exception):
    """A signal-triggered checkpoint was written; the launcher should requeue the job."""


REQUEUE_FILE_ENV = "MINITRON_REQUEUE_FILE"
"""Set by launch/torchrun.sh: torchrun reports every worker failure as exit 1, so a worker that
saved and wants a requeue also says so in this file."""


def announce_requeue(reason: str) -> None:
    """Tell the launcher (if it asked, via REQUEUE_FILE_ENV) that this rank saved and stopped."""
    path = os.environ.get(REQUEUE_FILE_ENV)
    if path:
        atomic_files.write_text(Path(path), reason + "\n")


class PreemptionFlag:
    """Records SIGUSR1 / SIGTERM while a training loop runs (a context manager: the previous
    handlers come back when it ends); `agreed` makes every rank stop at the same step. The
    first signal asks for a checkpoint at the end of the step; a second one of the same kind
    stops the process at once (the default action), as a user pressing it twice expects."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.raised = False
        self._previous = {}

    def __enter__(self) -> "PreemptionFlag":
        for sig in self.SIGNALS:
            try:
                self._previous[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread (e.g. an embedding program)
                pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame):
        self.raised = True
        signal.signal(signum, signal.SIG_DFL)
        if is_logging_process():
            name = signal.Signals(signum).name
            sys.stderr.write(f"minitron: {name}: saving a checkpoint at the end of this step, "
                             f"then exiting {EXIT_REQUEUE} (requeue); a second {name} stops at "
                             "once\n")
            sys.stderr.flush()

    def agreed(self, device: torch.device) -> bool:
        flag = torch.tensor([1.0 if self.raised else 0.0], device=device)
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())
