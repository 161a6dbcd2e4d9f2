"""Rotary position embedding in four element-wise kernels per pass, registered as megatron-core's
fused RoPE where Transformer-Engine does not provide one.

megatron's unfused `_apply_rotary_pos_emb_bshd` recomputes cos and sin of the frequencies for
query and key in every layer, multiplies them by mscale, builds rotate-half with a chunk, a neg
and a cat, and ends with a cat of the rotated part and an (empty) pass-through part: two full
copies of the tensor, and in backward a zero-filled slice gradient and another cat. Here, with
x = [x1, x2] split at half the rotary dim and the frequencies' cos/sin split the same way
(c1, c2, s1, s2):

    out1 = x1 * c1 - x2 * s1        grad_x1 = g1 * c1 + g2 * s2
    out2 = x2 * c2 + x1 * s2        grad_x2 = g2 * c2 - g1 * s1

which is megatron's `t * cos + rotate_half(t) * sin` written out; nothing but cos and sin is
saved for backward, and cos/sin are computed once per frequency tensor (GPTModel makes one per
forward and every layer shares it).

`install()` puts `apply_rope` where megatron-core looks for its fused RoPE
(`rope_utils.fused_apply_rotary_pos_emb`, TE's when TE imports); megatron itself then keeps its
unfused path for the cases a fused kernel does not take (mscale != 1, packed sequences, mRoPE).
"""

import weakref
from typing import Optional, Tuple

import torch

_cache: Optional[Tuple] = None


def _cos_sin(freqs: torch.Tensor, dtype: torch.dtype) -> Tuple[torch.Tensor, ...]:
    """(c1, c2, s1, s2) of `freqs` [s, b|1, 1, rot_dim] in `dtype`; the last tensor's are reused."""
    global _cache
    key = (freqs.data_ptr(), freqs._version, tuple(freqs.shape), freqs.device, dtype)
    if _cache is not None and _cache[0]() is freqs and _cache[1] == key:
        return _cache[2]
    half = freqs.shape[-1] // 2
    cos, sin = torch.cos(freqs).to(dtype), torch.sin(freqs).to(dtype)  # as megatron: in freqs' dtype
    parts = (cos[..., :half], cos[..., half:], sin[..., :half], sin[..., half:])
    _cache = (weakref.ref(freqs), key, parts)
    return parts


def _rotate(x: torch.Tensor, c1, c2, s1, s2, sign: float) -> torch.Tensor:
    """sign +1: the forward rotation; -1: its transpose (the backward). Dims past 2 x half
    (partial rotary) pass through. Forward writes its `[s, b, np, hn]` result laid out as
    `[b, np, s, hn]` in memory, the layout the attention kernel reads (SDPA takes
    `[b, np, s, hn]`; megatron's layout permuted is strided there, and torch's CPU flash
    kernel runs slower on it); backward's is contiguous `[s, b, np, hn]`, for megatron's
    QKV gradient."""
    half = c1.shape[-1]  # c*, s*: [s, 1, 1, rot/2]
    if sign > 0 and x.dim() == 4:
        sq, b, n, d = x.shape
        out = torch.empty((b, n, sq, d), dtype=x.dtype, device=x.device).permute(2, 0, 1, 3)
    else:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)  # contiguous [s, b, np, hn]
    x1, x2 = x[..., :half], x[..., half:2 * half]  # [s, b, np, rot/2] each (strided views)
    o1, o2 = out[..., :half], out[..., half:2 * half]
    # forward: o1 = x1 c1 - x2 s1, o2 = x2 c2 + x1 s2; transpose: o1 = x1 c1 + x2 s2, o2 = x2 c2 - x1 s1
    torch.mul(x1, c1, out=o1)
    o1.addcmul_(x2, s1 if sign > 0 else s2, value=-sign)
    torch.mul(x2, c2, out=o2)
    o2.addcmul_(x1, s2 if sign > 0 else s1, value=sign)
    if x.shape[-1] > 2 * half:
        out[..., 2 * half:] = x[..., 2 * half:]
    return out


class _RoPE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, t, c1, c2, s1, s2):
        ctx.save_for_backward(c1, c2, s1, s2)
        return _rotate(t, c1, c2, s1, s2, 1.0)

    @staticmethod
    def backward(ctx, grad):
        return (_rotate(grad, *ctx.saved_tensors, -1.0),) + (None,) * 4


def apply_rope(t: torch.Tensor, freqs: torch.Tensor, interleaved: bool = False,
               **_) -> torch.Tensor:
    """megatron's `fused_apply_rotary_pos_emb(t, freqs, interleaved)`: t [s, b, h, d], freqs
    [s, 1, 1, rot_dim <= d] (non-interleaved)."""
    if interleaved:
        raise NotImplementedError("apply_rope: interleaved rotary embeddings use megatron's "
                                  "unfused path (transformer_config leaves apply_rope_fusion off)")
    return _RoPE.apply(t, *_cos_sin(freqs, t.dtype))


def install() -> bool:
    """Make `apply_rope` megatron-core's fused RoPE unless Transformer-Engine's is there.
    True when megatron's fused-RoPE hook now runs ours."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is None:
        rope_utils.fused_apply_rotary_pos_emb = apply_rope
    return rope_utils.fused_apply_rotary_pos_emb is apply_rope


def uninstall() -> None:
    """Undo install() (tests compare with megatron's unfused path in the same process)."""
    from megatron.core.models.common.embeddings import rope_utils

    if rope_utils.fused_apply_rotary_pos_emb is apply_rope:
        rope_utils.fused_apply_rotary_pos_emb = None
