"""Per-chunk math of the logit losses on vocab-parallel shards.

Every function takes one chunk of tokens as fp32 tensors `[c, v_real/tp]` (this rank's real
vocabulary columns, already divided by the temperature; under TP they are overwritten, on one
rank only read) and returns `(per_token_loss [c], grad [c, v_real/tp])`: the loss of each token and its gradient with
respect to the scaled student logits. Softmaxes are vocab-parallel: the max is all-reduced (MAX),
the sum of exps and the per-token divergence partials are all-reduced (SUM), so the full
vocabulary is never gathered on a rank. `vocab_start` is the global id of the shard's first
column (tp_rank * v/tp: padding cut from the end of a shard does not move it). The gradients
are derived in the docstrings; the tests check them against autograd on float64 references.
"""

import math
from typing import Optional

import torch

from megatron_minitron.runtime.collectives import (all_gather_last_dim, all_reduce_max_,
                                                   all_reduce_sum_, spans_ranks)


def logsumexp(x: torch.Tensor, group) -> torch.Tensor:
    """Vocab-parallel logsumexp over the last dim; -inf entries (masked columns) are allowed."""
    if not spans_ranks(group):
        return torch.logsumexp(x, dim=-1)  # ATen's fused kernel
    # [c, v/tp] -> [c]
    m = x.amax(dim=-1) if x.shape[-1] else x.new_full(x.shape[:-1], -math.inf)
    m = all_reduce_max_(m, group)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an all -inf row stays -inf
    se = all_reduce_sum_(torch.exp(x - m.unsqueeze(-1)).sum(dim=-1), group)
    return m + se.log()


def log_softmax_(x: torch.Tensor, group) -> torch.Tensor:
    """Vocab-parallel log-softmax over the last dim, in place under TP (one [c, v/tp]
    temporary); on one rank ATen's fused kernel (one new [c, v] tensor, several times fewer
    passes over memory). Use the returned tensor, not x."""
    if not spans_ranks(group):
        return torch.log_softmax(x, dim=-1)
    m = all_reduce_max_(x.amax(dim=-1), group)  # [c]; x has >= 1 real column on every rank
    x.sub_(m.unsqueeze(-1))
    se = all_reduce_sum_(x.exp().sum(dim=-1), group)
    return x.sub_(se.log_().unsqueeze(-1))


def forward_kl(s: torch.Tensor, t: torch.Tensor, group):
    """KL(p || q) = sum p (log p - log q), p = teacher, q = student; d/dz_s = q - p."""
    loss, grad, _ = forward_kl_and_ce(s, t, group)
    return loss, grad


def forward_kl_and_ce(s: torch.Tensor, t: torch.Tensor, group,
                      labels: Optional[torch.Tensor] = None, vocab_start: int = 0):
    """forward_kl, and with `labels` (global ids [c]) also the student's per-token cross
    entropy -log q[label] read from the same log-softmax (no gradient; the temperature-1 LM
    loss when s is unscaled), else None: one pass over the logits fewer than
    cross_entropy_value."""
    logq, logp = log_softmax_(s, group), log_softmax_(t, group)
    ce = None if labels is None else -_picked(logq, labels, vocab_start, group)
    p = logp.exp()
    loss = all_reduce_sum_(logp.sub_(logq).mul_(p).sum(dim=-1), group)
    return loss, logq.exp_().sub_(p), ce


def _picked(x: torch.Tensor, labels: torch.Tensor, vocab_start: int, group) -> torch.Tensor:
    """x[i, labels[i]] as fp32 [c] from the rank whose shard holds the label, summed over TP."""
    v = x.shape[-1]
    local = labels - vocab_start
    owned = (local >= 0) & (local < v)
    picked = x.gather(-1, local.clamp(0, max(v - 1, 0)).unsqueeze(-1)).squeeze(-1).float()
    return all_reduce_sum_(torch.where(owned, picked, 0.0), group)


def reverse_kl(s: torch.Tensor, t: torch.Tensor, group):
    """KL(q || p) = sum q (log q - log p); d/dz_j = q_j (log q_j - log p_j - KL)."""
    logq, logp = log_softmax_(s, group), log_softmax_(t, group)
    diff = logq - logp  # the teacher's buffer is free after this
    q = logq.exp_()
    loss = all_reduce_sum_((q * diff).sum(dim=-1), group)
    return loss, diff.sub_(loss.unsqueeze(-1)).mul_(q)


def jsd(s: torch.Tensor, t: torch.Tensor, group, beta: float):
    """beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q.

    Since sum m log m = beta sum p log m + (1 - beta) sum q log m, the loss is
    beta sum p log p + (1 - beta) sum q log q - sum m log m, whose gradient in q_j is
    (1 - beta)(log q_j - log m_j); through the softmax:
    d/dz_j = (1 - beta) q_j (log q_j - log m_j - KL(q || m))."""
    logq, logp = log_softmax_(s, group), log_softmax_(t, group)
    logm = torch.logaddexp(logp + math.log(beta), logq + math.log1p(-beta))
    # [2, c]: the two KL partials, reduced in one collective
    partials = torch.stack([(logp.exp() * (logp - logm)).sum(dim=-1),
                            (logq.exp() * (logq - logm)).sum(dim=-1)])
    kl_pm, kl_qm = all_reduce_sum_(partials, group)
    loss = beta * kl_pm + (1.0 - beta) * kl_qm
    q = logq.exp()
    grad = logq.sub_(logm).sub_(kl_qm.unsqueeze(-1)).mul_(q).mul_(1.0 - beta)
    return loss, grad


def global_topk_mask(t: torch.Tensor, k: int, vocab_start: int, group) -> torch.Tensor:
    """Bool [c, v/tp]: which of this rank's columns are among the k largest teacher logits of
    the whole vocabulary. Each rank offers its local top-k (padded with -inf to k), the k
    candidates of all ranks are all-gathered ([c, tp*k], never the vocabulary) and every rank
    picks the same global top-k by value, then marks the ones it owns by global id."""
    c, v = t.shape
    kk = min(k, v)
    vals, idx = t.topk(kk, dim=-1) if kk else (t.new_empty(c, 0), t.new_empty(c, 0).long())
    if kk < k:  # short shard: pad so every rank gathers the same shape
        vals = torch.cat([vals, vals.new_full((c, k - kk), -math.inf)], dim=-1)
        idx = torch.cat([idx, idx.new_full((c, k - kk), -1)], dim=-1)
    gidx = torch.where(idx >= 0, idx + vocab_start, idx)
    all_vals = all_gather_last_dim(vals, group)  # [c, tp*k]
    all_gidx = all_gather_last_dim(gidx, group)  # [c, tp*k]
    top = all_vals.topk(k, dim=-1)
    sel = all_gidx.gather(-1, top.indices)  # [c, k] global ids
    sel = torch.where(torch.isfinite(top.values), sel, torch.full_like(sel, -1))
    local = sel - vocab_start
    owned = (sel >= 0) & (local >= 0) & (local < v)
    rows = torch.arange(c, device=t.device).unsqueeze(-1).expand_as(sel)
    mask = torch.zeros(c, v, dtype=torch.bool, device=t.device)
    mask[rows[owned], local[owned]] = True
    return mask


def topk_kl(s: torch.Tensor, t: torch.Tensor, group, k: int, vocab_start: int):
    """Forward KL over k + 1 outcomes: the teacher's global top-k tokens K one by one, and all
    other tokens as one bucket r: sum_{j in K} p_j log(p_j / q_j) + p_r log(p_r / q_r), with p and
    q the full-vocabulary softmaxes (no renormalisation over K, so the student's mass outside K
    is penalised as a whole). Gradient: q_j - p_j on K and q_j (1 - p_r / q_r) elsewhere (the
    bucket's target mass is spread like the student's own)."""
    in_k = global_topk_mask(t, k, vocab_start, group)
    logq, logp = log_softmax_(s, group), log_softmax_(t, group)
    neg_inf = torch.tensor(-math.inf, device=s.device)
    # [c]: log p_r, log q_r, the bucket's mass (logsumexp over the tokens outside K)
    logp_r = logsumexp(torch.where(in_k, neg_inf, logp), group)
    logq_r = logsumexp(torch.where(in_k, neg_inf, logq), group)
    p = logp.exp()
    in_k_part = all_reduce_sum_(torch.where(in_k, p * (logp - logq), 0.0).sum(dim=-1), group)
    p_r = logp_r.exp()
    rest = torch.isfinite(logq_r) & (p_r > 0)
    log_ratio = torch.where(rest, logp_r - logq_r, 0.0)
    bucket = torch.where(rest, p_r * log_ratio, 0.0)
    q = logq.exp_()
    target = torch.where(in_k, p, q * log_ratio.exp().unsqueeze(-1))
    return in_k_part + bucket, q.sub_(target)


def cross_entropy_value(z: torch.Tensor, labels: torch.Tensor, vocab_start: int, group
                        ) -> torch.Tensor:
    """Per-token student cross entropy [c] at temperature 1, without a gradient (for the log):
    logsumexp(z) - z[label]. Reads z [c, v/tp] (any float dtype), writes nothing to it."""
    return logsumexp(z.float(), group) - _picked(z, labels, vocab_start, group)


def cross_entropy(s: torch.Tensor, labels: torch.Tensor, vocab_start: int, group):
    """Student next-token cross entropy at temperature 1 (vocab-parallel, like megatron's):
    -log q[label]; d/dz = q - onehot(label). `labels` are global ids [c]."""
    c, v = s.shape
    logq = log_softmax_(s, group)
    local = labels - vocab_start
    owned = (local >= 0) & (local < v)
    picked = logq.gather(-1, local.clamp(0, max(v - 1, 0)).unsqueeze(-1)).squeeze(-1)
    loss = all_reduce_sum_(-torch.where(owned, picked, 0.0), group)
    grad = logq.exp_()
    rows = torch.arange(c, device=s.device)
    grad[rows[owned], local[owned]] -= 1.0
    return loss, grad
