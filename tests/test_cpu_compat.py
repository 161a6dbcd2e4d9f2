"""The CPU compatibility layer: what it maps, that it is narrow, and that megatron still needs it."""

import inspect

import pytest
import torch

from megatron_minitron.runtime import cpu_compat

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="CPU-only layer")


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


def test_factory_and_to_calls_land_on_cpu(cpu_layer):
    assert torch.zeros(2, device=torch.cuda.current_device()).device.type == "cpu"
    assert torch.empty(1, device="cuda").device.type == "cpu"
    t = torch.ones(3)
    assert t.cuda() is t
    assert t.to("cuda").device.type == "cpu"
    assert t.type() == "torch.cuda.FloatTensor"
    torch.cuda.synchronize()


def test_rng_tracker_forks_and_restores_the_cpu_generator(cpu_layer):
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


def test_moe_router_gemm_runs_without_transformer_engine():
    # megatron binds moe_utils.te_general_gemm only when TE imports, yet its router reads it
    # (NameError); install() binds None, which selects megatron's own torch.mm branch.
    from megatron.core.transformer.moe import moe_utils

    was = cpu_compat.is_installed()
    cpu_compat.uninstall()
    try:
        if moe_utils.HAVE_TE:
            pytest.skip("Transformer Engine is installed: megatron binds te_general_gemm")
        assert not hasattr(moe_utils, "te_general_gemm")
        x, w = torch.randn(3, 4, requires_grad=True), torch.randn(5, 4, requires_grad=True)
        with pytest.raises(NameError):
            moe_utils.router_gating_linear(x, w, None, torch.float32)
        cpu_compat.install()
        out = moe_utils.router_gating_linear(x, w, None, torch.float32)
        assert torch.allclose(out, x @ w.t())
        out.sum().backward()
        assert torch.allclose(w.grad, x.detach().sum(0).expand(5, 4))
        cpu_compat.uninstall()
        assert not hasattr(moe_utils, "te_general_gemm")
    finally:
        if was:
            cpu_compat.install()


class _AllocatesOnCudaInBackward(torch.autograd.Function):
    """Like megatron's gather/reduce-scatter mappings: backward allocates on current_device."""

    @staticmethod
    def forward(ctx, x):
        return x * 2

    @staticmethod
    def backward(ctx, grad):
        out = torch.empty(grad.shape, dtype=grad.dtype, device=torch.cuda.current_device())
        return out.copy_(grad * 2)


@pytest.mark.parametrize("how", ["autograd", "tensor"])
def test_custom_backward_allocating_on_cuda_runs_on_cpu(cpu_layer, how):
    x = torch.ones(3, requires_grad=True)
    y = _AllocatesOnCudaInBackward.apply(x)
    if how == "autograd":
        torch.autograd.backward(y, grad_tensors=torch.full((3,), 0.5), retain_graph=True)
    else:
        y.sum().backward()
    assert torch.equal(x.grad, torch.ones(3) if how == "autograd" else torch.full((3,), 2.0))
    z = torch.ones(2, requires_grad=True)
    (gz,) = torch.autograd.grad((z * 3).sum(), z)  # grad() untouched by the backward path
    assert torch.equal(gz, torch.full((2,), 3.0))
