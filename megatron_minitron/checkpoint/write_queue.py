"""megatron-core's checkpoint writer collects its write workers' results through a
multiprocessing Manager server that it starts on the first save
(`dist_checkpointing/strategies/filesystem_async.py`, `_get_write_results_queue`). A training
process killed with SIGKILL (the OOM killer, `scancel --signal=KILL`, a watchdog) runs no exit
handlers, so nothing stops that server: it stays, idle, holding its socket and any output pipe
it inherited (a `| tee` or a CI step then waits on it).

`queue_dies_with_process()` makes megatron's queue from a Manager server of our own whose
process asks the kernel to kill it when its parent dies (Linux `PR_SET_PDEATHSIG`). Elsewhere
(no glibc prctl) megatron's own queue is left in place. The kernel ties the signal to the thread
that started the server, so it is only set up from the main thread.
"""

import multiprocessing as mp
import os
import signal
import threading
from typing import Optional

from megatron_minitron.runtime.allocator import glibc

PR_SET_PDEATHSIG = 1
_manager = None


def _die_with_parent(parent_pid: int) -> None:
    """Manager server initializer: SIGKILL when the parent dies (and now, if it already has)."""
    glibc().prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(0)


def queue_dies_with_process() -> Optional[int]:
    """Give megatron's checkpoint writer a results queue whose Manager server dies with this
    process. Idempotent. Returns the server's pid, or None where it is left to megatron."""
    global _manager
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    if _manager is not None and filesystem_async._results_queue is not None:
        return _manager._process.pid
    if (filesystem_async._results_queue is not None or glibc() is None
            or threading.current_thread() is not threading.main_thread()):
        return None
    from multiprocessing.managers import SyncManager

    manager = SyncManager(ctx=mp.get_context("spawn"))
    manager.start(initializer=_die_with_parent, initargs=(os.getpid(),))
    _manager = manager
    filesystem_async._results_queue = manager.Queue()
    return manager._process.pid
