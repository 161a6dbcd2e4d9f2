import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("OMP_NUM_THREADS", "1")
sys.path.insert(0, str(Path(__file__).parent))


def pytest_collection_modifyitems(config, items):
    import torch

    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU; run on a GPU machine")
    for item in items:
        if "gpu" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_gpu)


@pytest.fixture
def cpu_layer():
    """runtime/cpu_compat.py installed for the test (megatron's CUDA calls mapped to the CPU),
    removed after it unless it was installed before."""
    from megatron_minitron.runtime import cpu_compat

    was = cpu_compat.is_installed()
    cpu_compat.install()
    yield
    if not was:
        cpu_compat.uninstall()
