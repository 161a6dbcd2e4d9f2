"""Weight gradients accumulated straight into megatron's fp32 `main_grad`, on any device.

Without apex's `fused_weight_gradient_mlp_cuda`, megatron-core's linear layers compute each
weight gradient into a fresh `[out, in]` tensor, which autograd hands to DDP's hook, which adds
it to `param.main_grad`: one weight-sized allocation and one extra read-modify-write pass per
linear layer per micro-batch. megatron's `gradient_accumulation_fusion` does the GEMM into
`main_grad` directly; `fuse_wgrad_accumulation` turns it on for the DDP-wrapped model's linear
layers with `addmm_` as the kernel (an in-place GEMM accumulate on the CPU and on CUDA) where
apex's is absent. fp32: the same gradients up to floating-point summation order; bf16: the
same arithmetic as unfused (`tests/test_wgrad.py`).

Left out on purpose: the output layer (its weight may be the tied input embedding, whose lookup
gradient reaches DDP through `param.grad`, which DDP would skip once the layer marked the
weight as accumulated) and weights without `main_grad` (frozen ones).
"""

import types
from typing import List

import torch


def _wgrad_gemm_accum(total_input: torch.Tensor, grad_output: torch.Tensor,
                      main_grad: torch.Tensor) -> None:
    """main_grad += grad_output^T @ total_input (2-D, as megatron prepares them). bf16
    activations keep their bf16 GEMM (fast on GPUs and AMX CPUs), added to the fp32 main_grad:
    the unfused path's arithmetic, less its hook call."""
    if total_input.dtype == main_grad.dtype:
        main_grad.addmm_(grad_output.t(), total_input)
    else:
        main_grad.add_(grad_output.t() @ total_input)


KERNEL = types.SimpleNamespace(wgrad_gemm_accum_fp32=_wgrad_gemm_accum,
                               wgrad_gemm_accum_fp16=_wgrad_gemm_accum)


def fuse_wgrad_accumulation(chunks: List[torch.nn.Module]) -> int:
    """Turn on gradient_accumulation_fusion in the DDP-wrapped chunks' megatron linear layers
    (apex's kernel if it imports, else KERNEL). Returns how many layers now accumulate."""
    from megatron.core.tensor_parallel import layers

    if not layers._grad_accum_fusion_available:
        layers.fused_weight_gradient_mlp_cuda = KERNEL
        layers._grad_accum_fusion_available = True
    linear = (layers.ColumnParallelLinear, layers.RowParallelLinear)
    n = 0
    for chunk in chunks:
        for name, m in chunk.named_modules():
            if (isinstance(m, linear) and not name.endswith("output_layer")
                    and hasattr(getattr(m, "weight", None), "main_grad")):
                m.gradient_accumulation_fusion = True
                n += 1
    return n
