"""SwiGLU without the passes megatron's unfused path adds, registered as megatron-core's fused
bias-SwiGLU for the local layer spec.

megatron's MLP without activation fusion computes `silu(x_glu) * (x_linear + glu_linear_offset)`
on the two halves of fc1's output: an extra full pass for the added offset (0 for SwiGLU), and
in backward a `cat` of the two halves' gradients into one `[s, b, 2f]` tensor. Its fused
variant (`bias_swiglu_impl`, TorchScript) also ends its backward with a `cat`. Here, with
x = [a, b] and act = silu(a) saved from forward:

    out = act * b                   grad_b = g * act
                                    grad_a = silu_backward(g * b, a)

each gradient half written straight into its half of one `[.., 2f]` tensor: no cat, no offset
pass. `install()` puts `swiglu_impl` where megatron's MLP looks for its fused SwiGLU
(`mlp.bias_swiglu_impl`); a biased call still goes to megatron's own kernel.
"""

from typing import Optional

import torch
import torch.nn.functional as F


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        a, b = x.chunk(2, dim=-1)
        act = F.silu(a)
        ctx.save_for_backward(x, act)
        return act * b

    @staticmethod
    def backward(ctx, grad):
        x, act = ctx.saved_tensors
        a, b = x.chunk(2, dim=-1)
        grad_x = torch.empty(x.shape, dtype=x.dtype, device=x.device)
        grad_a, grad_b = grad_x.chunk(2, dim=-1)
        torch.mul(grad, act, out=grad_b)
        torch.ops.aten.silu_backward.grad_input(grad * b, a, grad_input=grad_a)
        return grad_x


def swiglu(x: torch.Tensor) -> torch.Tensor:
    """silu(x[..., :f]) * x[..., f:] for x `[..., 2f]`."""
    return _SwiGLU.apply(x)


_megatron_impl = None


def swiglu_impl(input: torch.Tensor, bias: Optional[torch.Tensor], fp8_input_store: bool = False,
                cpu_offload_input: bool = False) -> torch.Tensor:
    """megatron's `bias_swiglu_impl(input, bias, fp8_input_store, cpu_offload_input)`."""
    if bias is not None or fp8_input_store or cpu_offload_input:
        return _megatron_impl(input, bias, fp8_input_store, cpu_offload_input)
    return swiglu(input)


def install() -> bool:
    """Make `swiglu_impl` megatron's MLP's fused SwiGLU. Idempotent; True when it is."""
    global _megatron_impl
    from megatron.core.transformer import mlp

    if mlp.bias_swiglu_impl is not swiglu_impl:
        _megatron_impl = mlp.bias_swiglu_impl
        mlp.bias_swiglu_impl = swiglu_impl
    return True


def uninstall() -> None:
    """Undo install() (tests compare with megatron's path in the same process)."""
    from megatron.core.transformer import mlp

    if mlp.bias_swiglu_impl is swiglu_impl:
        mlp.bias_swiglu_impl = _megatron_impl
