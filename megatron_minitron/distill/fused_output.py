"""Logit distillation fused with both models' output layers: from final hidden states to the
loss, chunk by chunk over tokens, so that no `[tokens, vocab]` logits tensor of either model is
ever made, in forward or backward.

For each chunk of c tokens (rows of the flattened `[s*b, h]` hidden states):

    z_s = h_s[rows] @ W_s[:nr].T        # [c, h_s] x [h_s, v/tp] -> [c, v/tp], student logits
    z_t = h_t[rows] @ W_t[:nr].T        # the teacher's, its hidden states carry no gradient
    g   = d loss / d z_s                # losses.chunk_loss: the divergence and its gradient
    dh_s[rows] = g @ W_s[:nr]           # [c, v/tp] x [v/tp, h_s] -> [c, h_s]
    dW_s[:nr] += g.T @ h_s[rows]        # [v/tp, c] x [c, h_s] -> [v/tp, h_s], fp32 accumulation

Under tensor parallelism each rank holds its vocabulary slice of both weights (megatron's
ColumnParallelLinear output layer); the softmax statistics are all-reduced inside chunk_loss,
and the hidden states pass through megatron's copy_to_tensor_model_parallel_region first (as
the output layer's own forward does), so the student's hidden-state gradient is summed over
the TP group in backward. Padded vocabulary rows (ids >= real_vocab_size) get no logit and zero
weight gradient. The weight gradient is accumulated over chunks in fp32: when the weight has
megatron DDP's fp32 `main_grad` and the caller says which loss scale backward will apply (the
training step does), straight into main_grad during forward, as megatron's
gradient_accumulation_fusion does on GPU, so no weight-sized temporary exists; otherwise into
one private buffer, added to main_grad or returned in the weight's dtype in backward.
"""

import math
from typing import Optional

import torch

from megatron_minitron.config.distill import DistillConfig
from megatron_minitron.distill.cached_targets import CachedTargets
from megatron_minitron.distill.losses import LogitLoss, chunk_loss
from megatron_minitron.distill.vocab_parallel import real_columns, vocab_range
from megatron_minitron.runtime.collectives import group_rank_size

FUSED_CHUNK_BYTES = {"cpu": 128 * 2**20, "cuda": 256 * 2**20}
"""Size of one fp32 `[tokens, vocab/tp]` chunk of logits (a few such temporaries are live at
once). Much larger than the unfused loss's chunk: each chunk streams both output weights
through three GEMMs, and with few rows they are memory-bound. On a 2-core CPU, SmolLM2's head
(vocabulary 49,152, 2,048 tokens, forward + backward) took 14.7 s in 85-row chunks (16 MiB),
11.2 s in 256-row, 8.9 s in 512-row and 8.9 s in 1,024-row chunks (measured while other jobs
shared the cores); 128 MiB is 682 rows there and 261 rows at vocabulary 128,256."""


def fused_chunk_rows(vocab_columns: int, device: torch.device) -> int:
    budget = FUSED_CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(16, budget // (4 * max(vocab_columns, 1)))


class _FusedLinearLogitLoss(torch.autograd.Function):
    """Forward computes the loss and both gradients chunk by chunk; backward only scales."""

    @staticmethod
    def forward(ctx, h_s, w_s, h_t, w_t, weights, labels, cfg: DistillConfig,
                real_vocab_size: Optional[int], group, needs_grad: bool,
                grad_scale: Optional[float]):
        tp_rank, _ = group_rank_size(group)
        v = w_s.shape[0]
        nr = real_columns(tp_rank, v, real_vocab_size)
        vocab_start, _ = vocab_range(tp_rank, v)
        ws, wt = w_s[:nr], (None if w_t is None else w_t[:nr])
        # [s, b, h] -> [s*b, h], in the weights' dtype (bf16 models hand over fp32 hidden
        # states: megatron's Float16Module upcasts the last stage's output)
        hs = h_s.reshape(-1, h_s.shape[-1]).to(ws.dtype)
        cached = isinstance(h_t, CachedTargets)  # the teacher's targets, in hs's row order
        ht = None if h_t is None or cached else h_t.reshape(-1, h_t.shape[-1]).to(wt.dtype)
        grad_h = grad_w = None
        direct = needs_grad and _main_grad(w_s) is not None and grad_scale is not None
        if needs_grad:
            grad_h = torch.empty_like(hs)
            # fp32 accumulation over chunks: straight into megatron's main_grad when the
            # caller knows the loss scale its backward will apply (no weight-sized temporary),
            # else a private buffer (for an fp32 weight, itself the gradient returned)
            grad_w = _main_grad(w_s) if direct else torch.zeros(
                w_s.shape, dtype=torch.float32, device=w_s.device)
        alpha = grad_scale if direct else 1.0
        sums = torch.zeros(2, dtype=torch.float32, device=hs.device)  # kd, ce
        step = cfg.token_chunk_size or fused_chunk_rows(nr, hs.device)
        for start in range(0, hs.shape[0], step):
            rows = slice(start, start + step)
            x = hs[rows]
            z_s = x @ ws.t()  # [c, h_s] x [h_s, v/tp] -> [c, v/tp]
            z_t = h_t.rows(rows) if cached else (None if ht is None else ht[rows] @ wt.t())
            lab = None if labels is None else labels[rows]
            g = chunk_loss(cfg, z_s, z_t, weights[rows], lab, vocab_start, group, sums,
                           owned=True)  # fp32 [c, v/tp]
            del z_s, z_t
            if not needs_grad:
                continue
            if ws.dtype == torch.float32:
                torch.mm(g, ws, out=grad_h[rows])  # [c, v/tp] x [v/tp, h_s] -> [c, h_s]
                grad_w[:nr].addmm_(g.t(), x, alpha=alpha)  # [v/tp, c] x [c, h_s]
            else:  # bf16: both GEMMs in bf16, as megatron's bf16 output layer does backward
                # (its grad_output is bf16; native on GPUs and on CPUs with AVX512-BF16 or
                # AMX, docs/PERFORMANCE.md); each chunk's weight gradient is added to the fp32
                # accumulator
                gb = g.to(ws.dtype)
                torch.mm(gb, ws, out=grad_h[rows])
                grad_w[:nr].add_(gb.t() @ x, alpha=alpha)
                del gb
            del g
        ctx.grads = (grad_h.view(h_s.shape), grad_w, w_s) if needs_grad else None
        ctx.direct, ctx.grad_scale, ctx.hidden_dtype = direct, grad_scale, h_s.dtype
        kd_sum, ce_sum = sums[0], sums[1]
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return cfg.kd_weight * kd_sum + cfg.ce_weight * ce_sum, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        if ctx.grads is None:
            raise RuntimeError("the fused logit loss supports one backward pass only")
        grad_h, grad_w, w_s = ctx.grads
        ctx.grads = None
        scale = float(grad_loss)
        main_grad = _main_grad(w_s)
        if ctx.direct:
            if not math.isclose(scale, ctx.grad_scale, rel_tol=1e-5):
                raise RuntimeError(
                    f"the fused logit loss wrote its weight gradient into main_grad for a loss "
                    f"scale of {ctx.grad_scale}, but backward applied {scale}: pass the scale "
                    "the schedule applies, or grad_scale=None")
            dw = None
        elif main_grad is not None:
            # megatron DDP's fp32 buffer: add in fp32 (no rounding to a bf16 weight's dtype,
            # no param.grad tensor); the tied embedding's own gradient still reaches param.grad
            # and DDP's hook adds it, since we leave grad_added_to_main_grad alone
            main_grad.add_(grad_w, alpha=scale)
            dw = None
        else:
            dw = grad_w.mul_(scale).to(w_s.dtype)
        grad_h = grad_h.to(ctx.hidden_dtype).mul_(grad_loss.to(ctx.hidden_dtype))
        return grad_h, dw, None, None, None, None, None, None, None, None, None


def _main_grad(weight: torch.Tensor) -> Optional[torch.Tensor]:
    """megatron DDP's fp32 gradient buffer of `weight`, when it has one."""
    g = getattr(weight, "main_grad", None)
    return g if g is not None and g.dtype == torch.float32 and g.shape == weight.shape \
        else None


def fused_logit_distillation_loss(student_hidden: torch.Tensor, student_weight: torch.Tensor,
                                  teacher_hidden: torch.Tensor, teacher_weight: torch.Tensor,
                                  cfg: DistillConfig, loss_mask: Optional[torch.Tensor] = None,
                                  labels: Optional[torch.Tensor] = None,
                                  real_vocab_size: Optional[int] = None, tp_group=None,
                                  reduction: str = "sum", batch_first: bool = False,
                                  grad_scale: Optional[float] = None) -> LogitLoss:
    """losses.logit_distillation_loss from final hidden states and output weights instead of
    logits; the same arguments otherwise, and the same result.

    student_hidden / teacher_hidden: `[s, b, h]` (or `[b, s, h]` with batch_first), after the
    final norm, already through the TP input region (tensor_parallel.copy_to_tensor_model_
    parallel_region under TP). student_weight / teacher_weight: the output layers' vocabulary
    shards `[v/tp, h]` (the embedding weights when tied); the student's gets a gradient.
    grad_scale: the factor the caller's backward will apply to the loss (megatron's schedule:
    1 / (num_tokens * num_microbatches)); with it, a weight that has megatron's fp32 main_grad
    gets its gradient added there during forward, chunk by chunk, so no weight-sized temporary
    exists; backward checks that the scale was right. Without it the gradient is accumulated
    in a private fp32 buffer. Under no_grad no gradient is computed at all.
    teacher_hidden may instead be the teacher's CachedTargets (distill/cached_targets.py) of
    these tokens, in the flattened order of student_hidden, with teacher_weight None."""
    from megatron_minitron.distill.losses import REDUCTIONS, token_weights

    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: use one of {REDUCTIONS}")
    d0, d1 = student_hidden.shape[:2]
    if teacher_hidden is not None and tuple(teacher_hidden.shape[:2]) != (d0, d1):
        raise ValueError(f"teacher hidden states {tuple(teacher_hidden.shape)} and student's "
                         f"{tuple(student_hidden.shape)} cover different tokens")
    v = student_weight.shape[0]
    if teacher_weight is not None and teacher_weight.shape[0] != v:
        tp_rank, tp_size = group_rank_size(tp_group)
        if tp_size > 1 or real_vocab_size is None or real_vocab_size > min(
                v, teacher_weight.shape[0]):
            raise ValueError(
                f"teacher output shard {teacher_weight.shape[0]} rows != student's {v}: give "
                "teacher and student the same padded vocabulary (make_vocab_size_divisible_by)"
                ", or at TP=1 pass real_vocab_size so both are cut to the real vocabulary")
    weights, labels, num_tokens = token_weights(d0, d1, loss_mask, labels, cfg, reduction,
                                                batch_first, student_hidden.device, v,
                                                real_vocab_size, tp_group)
    needs_grad = torch.is_grad_enabled() and (student_hidden.requires_grad or
                                              student_weight.requires_grad)
    loss, kd, ce = _FusedLinearLogitLoss.apply(
        student_hidden, student_weight, _detached(teacher_hidden), _detached(teacher_weight),
        weights, labels, cfg, real_vocab_size, tp_group, needs_grad, grad_scale)
    return LogitLoss(loss=loss, kd=kd, ce=ce if labels is not None else None,
                     num_tokens=num_tokens)


def schedule_loss_scale(loss_mask: torch.Tensor, num_microbatches: Optional[int]
                        ) -> Optional[float]:
    """The factor megatron's schedule applies to a step's summed loss before backward: 1 /
    (this micro-batch's loss tokens x micro-batches) (calculate_per_token_loss off; the
    optimizer's loss scale is 1 in fp32 and bf16); the `grad_scale` of the fused losses.
    None when the caller does not know its micro-batch count."""
    if num_microbatches is None:
        return None
    tokens = max(int((loss_mask != 0).sum()), 1)
    return 1.0 / (tokens * num_microbatches)


def _detached(x):
    return x.detach() if torch.is_tensor(x) else x  # None, or CachedTargets


LM_LOSS = DistillConfig(kd_weight=0.0, ce_weight=1.0)
"""The fused path with no teacher: next-token cross entropy alone."""


def fused_cross_entropy_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                             loss_mask: Optional[torch.Tensor] = None, tp_group=None,
                             reduction: str = "sum", batch_first: bool = False,
                             grad_scale: Optional[float] = None) -> LogitLoss:
    """The LM loss from final hidden states, fused with the output layer the same way (no
    `[tokens, vocab]` logits): megatron's vocab-parallel cross entropy over the whole padded
    vocabulary, as GPTModel computes it. `.loss` (= `.ce`) is the masked sum or mean."""
    return fused_logit_distillation_loss(hidden, weight, None, None, LM_LOSS, loss_mask=loss_mask,
                                         labels=labels, tp_group=tp_group, reduction=reduction,
                                         batch_first=batch_first, grad_scale=grad_scale)
