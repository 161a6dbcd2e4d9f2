"""training/clip_grads.py: torch's foreach kernels give megatron's grad norm and clipping the
same values as megatron's local fallbacks, in place, and build_optimizer switches them on."""

import pytest
import torch
from megatron.core import utils
from megatron.core.optimizer import clip_grads

from megatron_minitron.training.clip_grads import (foreach_l2_norm, foreach_scale,
                                                   use_foreach_clipping)


# megatron's local fallbacks allocate on "cuda": the CPU layer (conftest.py) maps that
pytestmark = pytest.mark.usefixtures("cpu_layer")


def _grads(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for shape in [(7, 5), (3,), (11, 4), (1,)]]


def test_norm_equals_megatron_local_norm():
    grads = _grads()
    ours, _ = foreach_l2_norm(2048, None, [grads], False)
    ref, _ = utils.local_multi_tensor_l2_norm(2048, None, [grads], False)
    assert ours.shape == (1,) and ours.dtype == torch.float32
    assert torch.equal(ours, ref.cpu())
    torch.testing.assert_close(ours[0], torch.cat([x.flatten() for x in grads]).norm())
    empty, _ = foreach_l2_norm(2048, None, [[]], False)
    assert float(empty) == 0.0


def test_scale_in_place_and_into_other_tensors_equals_megatron_local_scale():
    grads, ref = _grads(), _grads()
    ptrs = [x.data_ptr() for x in grads]
    foreach_scale(2048, None, [grads, grads], 0.37)
    utils.local_multi_tensor_scale(2048, None, [ref, ref], 0.37)
    assert [x.data_ptr() for x in grads] == ptrs  # in place
    for a, b in zip(grads, ref):
        assert torch.equal(a, b)
    src, dst = _grads(1), [torch.empty(x.shape) for x in _grads(1)]
    foreach_scale(2048, None, [src, dst], 2.5)
    for s, d in zip(src, dst):
        assert torch.equal(d, s * 2.5)


def test_megatron_clipping_uses_them_with_the_same_result(monkeypatch):
    # a world of one: megatron's all-reduce of the squared norm is the identity
    monkeypatch.setattr(torch.distributed, "all_reduce", lambda *a, **k: None)
    before = (clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl)
    params = [torch.nn.Parameter(torch.zeros(x.shape)) for x in _grads()]
    try:
        clip_grads.l2_norm_impl = utils.local_multi_tensor_l2_norm
        clip_grads.multi_tensor_scale_impl = utils.local_multi_tensor_scale
        results = []
        for foreach in (False, True):
            if foreach:
                assert use_foreach_clipping()
                assert clip_grads.l2_norm_impl is foreach_l2_norm
            for p, g in zip(params, _grads()):
                p.grad = g.clone()
            norm = clip_grads.get_grad_norm_fp32([p.grad for p in params])
            clip_grads.clip_grad_by_total_norm_fp32(params, max_norm=1.0, total_norm=norm)
            results.append((norm, [p.grad.clone() for p in params]))
        (n0, g0), (n1, g1) = results
        assert n0 == n1 and n0 > 1.0  # clipping happened
        for a, b in zip(g0, g1):
            assert torch.equal(a, b)
        total = torch.sqrt(sum((g * g).sum() for g in g1))
        torch.testing.assert_close(total, torch.tensor(1.0), atol=1e-5, rtol=0)
    finally:
        clip_grads.l2_norm_impl, clip_grads.multi_tensor_scale_impl = before
