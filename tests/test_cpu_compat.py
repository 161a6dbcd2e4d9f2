"""The CPU compatibility layer: what it maps, that it is narrow, and that megatron still needs it."""

import inspect

import pytest
import torch

from megatron_minitron.runtime import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only layer")


@pytest.fixture
def installed():
    was = cpu_compat.is_installed()
    cpu_compat.install()
    yield
    if not was:
        cpu_compat.uninstall()


def test_every_patched_attribute_exists_in_megatron_and_torch():
    # If megatron-core renames or drops a function we patch, this fails before anything subtle.
    for (owner, attr), _ in cpu_compat._patches().items():
        assert hasattr(owner, attr), f"{owner.__name__}.{attr} is gone: revisit cpu_compat"


def test_megatron_still_hardcodes_what_we_map():
    # The day megatron-core stops hard-coding these, the layer can shrink: this test says so.
    from megatron.core.pipeline_parallel import schedules
    from megatron.core.tensor_parallel import random

    assert 'device="cuda"' in inspect.getsource(schedules)
    assert "torch.cuda.get_rng_state" in inspect.getsource(random)


def test_factory_and_to_calls_land_on_cpu(installed):
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.empty(1, device="cuda").device.type == "cpu"
    t = torch.ones(3)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.type() == "torch.cuda.FloatTensor"
    torch.cuda.synchronize()


def test_rng_tracker_forks_and_restores_the_cpu_generator(installed):
    from megatron.core.tensor_parallel.random import (get_cuda_rng_tracker,
                                                      model_parallel_cuda_manual_seed)

    model_parallel_cuda_manual_seed(123, tp_rank=0, ep_rank=0, etp_rank=0, force_reset_rng=True)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with get_cuda_rng_tracker().fork():
        inside = torch.rand(4)
    assert torch.equal(torch.get_rng_state(), before)  # default stream untouched
    with get_cuda_rng_tracker().fork():
        again = torch.rand(4)
    assert not torch.equal(inside, again)  # the tracker's own stream advanced


def test_uninstall_restores_torch():
    was = cpu_compat.is_installed()
    cpu_compat.install()
    cpu_compat.uninstall()
    assert torch.ones(1).type() == "torch.FloatTensor"
    assert torch.cuda.synchronize.__module__.startswith("torch")
    if was:
        cpu_compat.install()
