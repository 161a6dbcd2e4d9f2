"""runtime/allocator.py: after keep_freed_memory(), a freed step-sized buffer is reused without
page faults; release_freed_memory() hands it back. Each case in a fresh interpreter (the
setting is process-wide)."""

import subprocess
import sys

import pytest

SCRIPT = r"""
import resource, sys, torch
from megatron_minitron.runtime.allocator import keep_freed_memory, release_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()

def faults_of_one_step():
    # what a training step does: the same set of 1-64 MiB tensors made, used and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    kept = [torch.ones(mib * 2**20 // 4) * 2.0 for mib in (1, 4, 16, 32, 8, 64)]
    del kept
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

faults_of_one_step()
faults_of_one_step()
print(sum(faults_of_one_step() for _ in range(4)))
if sys.argv[1] == "keep":
    assert release_freed_memory()
"""


def _faults(mode):
    out = subprocess.run([sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.split()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    default, keep = _faults("default"), _faults("keep")
    pages = 4 * 2 * (1 + 4 + 16 + 32 + 8 + 64) * 2**20 // 4096  # 4 steps of 2 x 125 MiB
    assert default > pages // 4  # glibc unmaps the large ones: they fault in every step
    assert keep < default // 4
