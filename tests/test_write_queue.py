"""checkpoint/write_queue.py: the Manager server that megatron's checkpoint writer uses dies
with a training process killed by SIGKILL (megatron's own stays behind)."""

import os
import signal
import subprocess
import sys
import time

import pytest

CHILD = r"""
import os, sys
from megatron.core.dist_checkpointing.strategies import filesystem_async
if sys.argv[1] == "ours":
    from megatron_minitron.checkpoint.write_queue import queue_dies_with_process
    pid = queue_dies_with_process()
    assert pid is not None and queue_dies_with_process() == pid  # idempotent
    filesystem_async._get_write_results_queue().put("works")
    assert filesystem_async._get_write_results_queue().get() == "works"
else:
    filesystem_async._get_write_results_queue()
import psutil
server, = [c.pid for c in psutil.Process().children() if "resource_tracker" not in " ".join(c.cmdline())]
print(server, flush=True)
os.kill(os.getpid(), 9)
"""


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _server_after_kill(mode: str, tmp_path) -> bool:
    """Whether the Manager server is alive 10 s after its parent was SIGKILLed."""
    # output to files, not pipes: a server left behind would hold a pipe open (the defect)
    log = tmp_path / f"{mode}.out"
    with open(log, "w") as f:
        rc = subprocess.run([sys.executable, "-c", CHILD, mode], stdout=f,
                            stderr=subprocess.STDOUT, timeout=120).returncode
    assert rc == -signal.SIGKILL, log.read_text()
    server = int(log.read_text().split()[-1])
    deadline = time.time() + 10
    while time.time() < deadline and _alive(server):
        time.sleep(0.2)
    alive = _alive(server)
    if alive:
        os.kill(server, signal.SIGKILL)  # leave nothing behind
    return alive


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_write_queue_server_dies_with_a_killed_process(tmp_path):
    assert _server_after_kill("megatron", tmp_path)  # the defect this fixes: the test can fail
    assert not _server_after_kill("ours", tmp_path)
