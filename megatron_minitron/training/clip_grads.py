"""Gradient norm and clipping in torch's multi-tensor (foreach) kernels, where megatron-core falls
back to its local implementations.

Without Transformer-Engine or apex, megatron's `clip_grads` computes the global gradient norm as
one `torch.norm` per gradient gathered through a Python list into a new tensor, and clips with
`dst.copy_(src * scale)` per gradient: a gradient-sized temporary and a second pass over every
gradient, every step that clips.
`use_foreach_clipping()` swaps in `torch._foreach_norm` and an in-place `torch._foreach_mul_`:
the same values (the norm from the same per-tensor norms, the scaling the same fp32 product;
`tests/test_clip_grads.py`), one pass, no temporaries. TE's and apex's kernels are left alone.
"""

from typing import List

import torch


def foreach_l2_norm(chunk_size, noop_flag, tensor_lists: List[List[torch.Tensor]],
                    per_tensor: bool, *args):
    """megatron's `local_multi_tensor_l2_norm` contract: ([1] fp32 norm of all tensors, None)."""
    norms = [n.float() for lst in tensor_lists if lst for n in torch._foreach_norm(lst)]
    if not norms:  # megatron does not call it so; its own fallback's device, for the caller
        return torch.zeros(1, dtype=torch.float32, device=_default_device()), None
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _default_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() \
        else torch.device("cpu")


def foreach_scale(chunk_size, noop_flag, tensor_lists: List[List[torch.Tensor]], scale) -> None:
    """megatron's `local_multi_tensor_scale` contract: dst = src * scale, per pair."""
    src, dst = tensor_lists
    if not src:
        return
    if all(s is d for s, d in zip(src, dst)):
        torch._foreach_mul_(dst, scale)
    else:
        torch._foreach_copy_(dst, torch._foreach_mul(src, scale))


def use_foreach_clipping() -> bool:
    """Point megatron's grad-norm and clipping at the foreach kernels when it uses its local
    fallbacks. Idempotent; True when they are now in use."""
    from megatron.core import utils
    from megatron.core.optimizer import clip_grads

    if clip_grads.l2_norm_impl is utils.local_multi_tensor_l2_norm:
        clip_grads.l2_norm_impl = foreach_l2_norm
    if clip_grads.multi_tensor_scale_impl is utils.local_multi_tensor_scale:
        clip_grads.multi_tensor_scale_impl = foreach_scale
    return (clip_grads.l2_norm_impl is foreach_l2_norm
            and clip_grads.multi_tensor_scale_impl is foreach_scale)
