"""models/rope.py against megatron-core's unfused rotary embedding: values and gradients in
fp64, partial rotary, strided inputs, the cos/sin cache, and megatron's own dispatch to it."""

import types

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils

from megatron_minitron.models import rope


def _freqs(seq, rot_dim, base=10000.0, offset=0.0):
    inv = 1.0 / base ** (torch.arange(0, rot_dim, 2, dtype=torch.float64) / rot_dim)
    f = torch.outer(torch.arange(seq, dtype=torch.float64) + offset, inv)
    return torch.cat((f, f), dim=-1)[:, None, None, :]  # megatron's RotaryEmbedding layout


def _both(t, freqs):
    """(ours, megatron's) outputs and input gradients for the same upstream gradient."""
    g = torch.randn(t.shape, dtype=t.dtype, generator=torch.Generator().manual_seed(1))
    out = []
    for fn in (rope.apply_rope, rope_utils._apply_rotary_pos_emb_bshd):
        x = t.detach().clone().requires_grad_(True)
        y = fn(x, freqs)
        y.backward(g)
        out.append((y.detach(), x.grad))
    return out


@pytest.mark.parametrize("rot_dim", [16, 8])  # all of head dim 16, and partial rotary
def test_rope_matches_megatron_in_fp64(rot_dim):
    t = torch.randn(12, 3, 4, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (y, gx), (y_ref, gx_ref) = _both(t, _freqs(12, rot_dim))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    if rot_dim < 16:  # the pass-through dims are copied, their gradient passes unchanged
        assert torch.equal(y[..., rot_dim:], t[..., rot_dim:])


def test_rope_takes_strided_inputs_and_fp32():
    # megatron hands RoPE a view of the fused QKV projection: not contiguous
    qkv = torch.randn(10, 2, 3, 3 * 8, generator=torch.Generator().manual_seed(2))
    q = qkv[..., :8]
    assert not q.is_contiguous()
    (y, gx), (y_ref, gx_ref) = _both(q, _freqs(10, 8).float())
    torch.testing.assert_close(y, y_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-6, atol=1e-6)


def test_cos_sin_are_recomputed_when_the_frequencies_change():
    t = torch.randn(6, 1, 2, 8, dtype=torch.float64)
    freqs = _freqs(6, 8)
    first = rope.apply_rope(t, freqs)
    assert torch.equal(rope.apply_rope(t, freqs), first)  # cached cos/sin: same result
    freqs.mul_(2.0)  # in place: a new version of the same tensor
    torch.testing.assert_close(rope.apply_rope(t, freqs),
                               rope_utils._apply_rotary_pos_emb_bshd(t, freqs))
    other = _freqs(6, 8, offset=3.0)  # another tensor
    torch.testing.assert_close(rope.apply_rope(t, other),
                               rope_utils._apply_rotary_pos_emb_bshd(t, other))


def test_megatron_dispatches_to_it_and_keeps_its_own_path_for_mscale():
    installed_before = rope_utils.fused_apply_rotary_pos_emb
    try:
        assert rope.install()
        config = types.SimpleNamespace(apply_rope_fusion=True, mrope_section=None,
                                       rotary_interleaved=False, multi_latent_attention=False)
        t = torch.randn(5, 2, 2, 8, dtype=torch.float64)
        freqs = _freqs(5, 8)
        calls = []
        real = rope_utils.fused_apply_rotary_pos_emb
        rope_utils.fused_apply_rotary_pos_emb = lambda *a, **k: calls.append(1) or real(*a, **k)
        y = rope_utils.apply_rotary_pos_emb(t, freqs, config, cp_group=object())
        assert calls == [1]
        torch.testing.assert_close(y, rope_utils._apply_rotary_pos_emb_bshd(t, freqs))
        # mscale != 1: megatron warns and runs its unfused path, which scales cos and sin
        with pytest.warns(UserWarning, match="mscale"):
            y2 = rope_utils.apply_rotary_pos_emb(t, freqs, config, mscale=2.0, cp_group=object())
        assert calls == [1]
        torch.testing.assert_close(y2, rope_utils._apply_rotary_pos_emb_bshd(t, freqs, mscale=2.0))
    finally:
        rope_utils.fused_apply_rotary_pos_emb = installed_before


def test_interleaved_is_refused():
    with pytest.raises(NotImplementedError, match="interleaved"):
        rope.apply_rope(torch.zeros(2, 1, 1, 4), _freqs(2, 4), interleaved=True)


def test_forward_is_laid_out_for_the_attention_kernel_and_backward_for_megatron():
    """The rotated query/key come out `[s, b, np, hn]` with `[b, np, s, hn]` memory (what SDPA
    reads after SDPAttention's permute), their gradient contiguous `[s, b, np, hn]`."""
    t = torch.randn(7, 2, 3, 8, dtype=torch.float64, requires_grad=True)
    y = rope.apply_rope(t, _freqs(7, 8))
    assert y.shape == t.shape and not y.is_contiguous()
    assert y.permute(1, 2, 0, 3).is_contiguous()
    torch.testing.assert_close(y, rope_utils._apply_rotary_pos_emb_bshd(t.detach(), _freqs(7, 8)))
    y.backward(torch.randn(2, 3, 7, 8, dtype=torch.float64).permute(2, 0, 1, 3))
    assert t.grad.is_contiguous()
