"""Logit distillation loss on megatron-core's vocab-parallel logits, chunked over tokens.

Logits arrive as megatron-core's output layer produces them: `[s, b, v/tp]` (or `[b, s, v/tp]`
as GPTModel.forward(labels=None) returns them: pass batch_first=True), each TP rank holding its
contiguous slice of the (padded) vocabulary. The loss is computed chunk by chunk along tokens;
each chunk is upcast to fp32 (a copy only where the math works in place: under TP, or for
other dtypes), its loss and its gradient with respect to the student logits are computed right
away (divergences.py) and the gradient is written into one buffer of the student logits' dtype.
Nothing else is kept for backward, so the extra memory is that buffer plus a few
`token_chunk_size x v/tp` fp32 temporaries, instead of several fp32 copies of all the logits.

Padded vocabulary columns (ids >= real_vocab_size) are dropped on both sides, which is the same
as setting them to -inf: they get no probability and zero gradient.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_minitron.config.distill import DistillConfig
from megatron_minitron.distill import divergences
from megatron_minitron.distill.cached_targets import CachedTargets
from megatron_minitron.distill.vocab_parallel import real_columns, vocab_range
from megatron_minitron.runtime.collectives import group_rank_size, spans_ranks

REDUCTIONS = ("sum", "mean")


@dataclass
class LogitLoss:
    """What `logit_distillation_loss` returns."""

    loss: torch.Tensor
    """Differentiable fp32 scalar: kd_weight * kd + ce_weight * ce."""
    kd: torch.Tensor
    """Detached distillation term (times temperature**2 when so configured), same reduction."""
    ce: Optional[torch.Tensor]
    """Detached student cross entropy at temperature 1 (same reduction), computed in the same
    chunked pass (trained on when ce_weight > 0, else only for the log); None without labels."""
    num_tokens: torch.Tensor
    """Number of tokens with a non-zero loss mask (int scalar), for megatron's per-token sums."""


CHUNK_BYTES = {"cpu": 2 * 2**20, "cuda": 512 * 2**20}
"""Size of one fp32 [tokens, vocab/tp] chunk when distill.token_chunk_size is None. On CPU,
temporaries above a few MiB are fresh mmap'd pages on every allocation (page faults on first
touch) and miss the cache: at vocabulary 8k, 128-token chunks ran forward+backward 2.7x faster
than 1024-token chunks. On GPU larger chunks amortise kernel launches."""


def chunk_rows(vocab_columns: int, device: torch.device) -> int:
    """Tokens per chunk so that one fp32 chunk of `vocab_columns` fits CHUNK_BYTES."""
    budget = CHUNK_BYTES["cuda" if device.type == "cuda" else "cpu"]
    return max(1, budget // (4 * max(vocab_columns, 1)))


class _ChunkedLogitLoss(torch.autograd.Function):
    """Loss forward with the gradient computed chunk by chunk; backward only scales it."""

    @staticmethod
    def forward(ctx, student, teacher, weights, labels, cfg: DistillConfig, real_vocab_size,
                group):
        tp_rank, _ = group_rank_size(group)
        v = student.shape[-1]
        nr = real_columns(tp_rank, v, real_vocab_size)
        vocab_start, _ = vocab_range(tp_rank, v)
        s_flat = student.reshape(-1, v)  # [s, b, v/tp] -> [s*b, v/tp]
        t_flat = teacher.reshape(-1, teacher.shape[-1])
        grad = torch.empty_like(s_flat)
        grad[:, nr:] = 0
        sums = torch.zeros(2, dtype=torch.float32, device=student.device)  # kd, ce
        step = cfg.token_chunk_size or chunk_rows(nr, student.device)
        for start in range(0, s_flat.shape[0], step):
            rows = slice(start, start + step)
            lab = None if labels is None else labels[rows]
            grad[rows, :nr] = chunk_loss(cfg, s_flat[rows, :nr], t_flat[rows, :nr],
                                         weights[rows], lab, vocab_start, group, sums,
                                         owned=False)
        ctx.grad = grad.view(student.shape)
        kd_sum, ce_sum = sums[0], sums[1]
        ctx.mark_non_differentiable(kd_sum, ce_sum)
        return cfg.kd_weight * kd_sum + cfg.ce_weight * ce_sum, kd_sum, ce_sum

    @staticmethod
    def backward(ctx, grad_loss, _grad_kd, _grad_ce):
        grad = ctx.grad
        if grad is None:
            raise RuntimeError("the chunked logit loss supports one backward pass only "
                               "(its gradient buffer is consumed in place)")
        ctx.grad = None
        return grad.mul_(grad_loss.to(grad.dtype)), None, None, None, None, None, None


def chunk_loss(cfg: DistillConfig, s_raw: torch.Tensor, t_raw: Optional[torch.Tensor],
               w: torch.Tensor,
               labels: Optional[torch.Tensor], vocab_start: int, group, sums: torch.Tensor,
               owned: bool) -> torch.Tensor:
    """One chunk of tokens: adds its weighted KD and CE sums to `sums` ([2] fp32: kd, ce) and
    returns d(kd_weight * kd + ce_weight * ce) / d s_raw, fp32 `[c, v_real/tp]`.

    s_raw, t_raw: `[c, v_real/tp]` logits of any dtype (not yet divided by the temperature);
    t_raw None: no teacher, the cross entropy alone (the LM loss; cfg.kd_weight is ignored);
    t_raw CachedTargets: the teacher's cached targets of these tokens (cached_targets.py);
    w: `[c]` per-token weights (mask / normaliser); labels: `[c]` global ids or None.
    owned: the caller gives up s_raw and t_raw, so the math may overwrite them (saves copies
    when the logits were made just for this chunk, as in the fused output layer)."""
    temp = cfg.temperature
    kd_scale = temp * temp if cfg.scale_by_temperature_squared else 1.0
    g_ce = None
    if cfg.ce_weight > 0:  # before the divergence, which may overwrite owned logits
        # the vocab-parallel log-softmax overwrites its input (on one rank it makes a new
        # tensor): copy only when that input is still needed afterwards
        keep = t_raw is not None or not owned
        x = s_raw.to(torch.float32, copy=keep and spans_ranks(group))
        per_token, g_ce = divergences.cross_entropy(x, labels, vocab_start, group)
        sums[1] += (per_token * w).sum()
        g_ce.mul_((w * cfg.ce_weight).unsqueeze(-1))
        del x
    # the student's LM loss for the log, no gradient: from forward KL's own log-softmax when
    # that is the student's at temperature 1, else a logsumexp pass of its own
    log_ce = g_ce is None and labels is not None
    ce_from_kd = (log_ce and cfg.logit_loss == "forward_kl" and temp == 1.0
                  and torch.is_tensor(t_raw))
    if log_ce and not ce_from_kd:
        sums[1] += (divergences.cross_entropy_value(s_raw, labels, vocab_start, group) * w).sum()
    if t_raw is None:
        return g_ce
    copy = spans_ranks(group) and not owned  # the vocab-parallel softmax overwrites its input
    s = _scaled_fp32(s_raw, temp, copy)
    if isinstance(t_raw, CachedTargets):  # the teacher read from a cache
        per_token, g = t_raw.divergence(s, vocab_start, group)
    elif ce_from_kd:
        t = _scaled_fp32(t_raw, temp, copy)
        per_token, g, ce = divergences.forward_kl_and_ce(s, t, group, labels, vocab_start)
        sums[1] += (ce * w).sum()
        del t, ce
    else:
        t = _scaled_fp32(t_raw, temp, copy)
        per_token, g = _divergence(cfg, s, t, vocab_start, group)
        del t
    del s
    sums[0] += (per_token * w).sum() * kd_scale
    g.mul_((w * (cfg.kd_weight * kd_scale / temp)).unsqueeze(-1))
    return g if g_ce is None else g.add_(g_ce)


def _scaled_fp32(x: torch.Tensor, temp: float, copy: bool) -> torch.Tensor:
    """x / temp in fp32: a private copy when asked (the divergence will overwrite it and x must
    survive), else x itself when already fp32 and temp is 1 (no pass over memory)."""
    fresh = copy or x.dtype != torch.float32
    x = x.to(torch.float32, copy=copy)
    if temp == 1.0:
        return x
    return x.div_(temp) if fresh else x / temp


def _divergence(cfg: DistillConfig, s, t, vocab_start: int, group):
    if cfg.logit_loss == "forward_kl":
        return divergences.forward_kl(s, t, group)
    if cfg.logit_loss == "reverse_kl":
        return divergences.reverse_kl(s, t, group)
    if cfg.logit_loss == "jsd":
        return divergences.jsd(s, t, group, cfg.jsd_beta)
    return divergences.topk_kl(s, t, group, cfg.top_k, vocab_start)


def logit_distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                            cfg: DistillConfig, loss_mask: Optional[torch.Tensor] = None,
                            labels: Optional[torch.Tensor] = None,
                            real_vocab_size: Optional[int] = None, tp_group=None,
                            reduction: str = "sum", batch_first: bool = False) -> LogitLoss:
    """Distillation (+ optional cross entropy) loss of vocab-parallel logits.

    student_logits, teacher_logits: vocab shards `[s, b, v/tp]` as megatron's output layer
    makes them, or `[b, s, v/tp]` with batch_first=True (what GPTModel.forward returns when
    called with labels=None). Any dtype, kept as is (chunks are upcast to fp32). The teacher
    gets no gradient.
    loss_mask: `[b, s]` (megatron's batch layout, batch["loss_mask"]); None means all ones.
    labels: `[b, s]` global token ids (batch["labels"]); needed when cfg.ce_weight > 0.
    real_vocab_size: the tokenizer's vocabulary; larger ids are padding and are ignored.
    tp_group: the tensor-parallel group (ParallelContext.tp_group); None for TP=1.
    reduction: "sum" over masked tokens (megatron's loss_func contract, with num_tokens) or
    "mean" over masked tokens.
    """
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction {reduction!r}: use one of {REDUCTIONS}")
    d0, d1, v = student_logits.shape
    _, tp_size = group_rank_size(tp_group)
    if teacher_logits.shape[:2] != (d0, d1):
        raise ValueError(f"teacher logits {tuple(teacher_logits.shape)} and student logits "
                         f"{tuple(student_logits.shape)} cover different tokens")
    if teacher_logits.shape[-1] != v:
        if tp_size > 1 or real_vocab_size is None or real_vocab_size > min(
                v, teacher_logits.shape[-1]):
            raise ValueError(
                f"teacher vocab shard {teacher_logits.shape[-1]} != student shard {v}: give "
                "teacher and student the same padded vocabulary (make_vocab_size_divisible_by)"
                ", or at TP=1 pass real_vocab_size so both are cut to the real vocabulary")
        # TP=1: cut both to the real vocabulary; the slice gives the padding zero gradient
        student_logits = student_logits[..., :real_vocab_size]
        teacher_logits = teacher_logits[..., :real_vocab_size]
    weights, labels, num_tokens = token_weights(d0, d1, loss_mask, labels, cfg, reduction,
                                                batch_first, student_logits.device,
                                                student_logits.shape[-1], real_vocab_size,
                                                tp_group)
    loss, kd, ce = _ChunkedLogitLoss.apply(student_logits, teacher_logits.detach(), weights,
                                           labels, cfg, real_vocab_size, tp_group)
    return LogitLoss(loss=loss, kd=kd, ce=ce if labels is not None else None,
                     num_tokens=num_tokens)


def token_weights(d0: int, d1: int, loss_mask: Optional[torch.Tensor],
                  labels: Optional[torch.Tensor], cfg: DistillConfig, reduction: str,
                  batch_first: bool, device: torch.device, local_vocab: int,
                  real_vocab_size: Optional[int], tp_group):
    """(per-token weights [d0*d1], labels [d0*d1] or None, num_tokens) in the token order of
    the logits / hidden states `[d0, d1, ...]`; checks that this rank holds real columns."""
    b, s_len = (d0, d1) if batch_first else (d1, d0)
    tp_rank, _ = group_rank_size(tp_group)
    if real_columns(tp_rank, local_vocab, real_vocab_size) < 1:
        raise ValueError(f"TP rank {tp_rank} holds only vocabulary padding (real_vocab_size "
                         f"{real_vocab_size}): use less padding or a smaller TP")
    mask = torch.ones(d0, d1, device=device) if loss_mask is None else (
        _like_logits(loss_mask, b, s_len, batch_first).float())
    num_tokens = (mask != 0).sum()
    weights = mask.reshape(-1)
    if reduction == "mean":
        weights = weights / mask.sum().clamp(min=1.0)
    if cfg.ce_weight > 0 and labels is None:
        raise ValueError("cfg.ce_weight > 0 needs labels")
    if labels is not None:
        labels = _like_logits(labels, b, s_len, batch_first).reshape(-1)
    return weights, labels, num_tokens


def _like_logits(x: torch.Tensor, b: int, s_len: int, batch_first: bool) -> torch.Tensor:
    """megatron's [b, s] masks/labels in the token layout of the logits."""
    if x.shape != (b, s_len):
        raise ValueError(f"mask/labels shape {tuple(x.shape)}: expected megatron's [b, s] = "
                         f"{(b, s_len)}")
    return x if batch_first else x.transpose(0, 1).contiguous()  # [b, s] -> [s, b]
