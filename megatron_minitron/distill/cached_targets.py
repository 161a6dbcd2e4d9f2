"""The teacher side of the logit loss read from a cache (distill/teacher_cache.py): per token,
k global token ids with the teacher's probabilities of them, instead of the teacher's logits.

Two records, one divergence each, on the student's vocab-parallel shard `[c, v_real/tp]`
(fp32, already divided by the temperature; overwritten). Each rank takes the cached ids that
fall in its vocabulary slice; the student's log-softmax normaliser and the per-token sums are
all-reduced over the TP group (distill/divergences.py), so the full vocabulary is never
gathered.

- top-k: the teacher's k most likely tokens K with log p_i, and the tail log-mass log p_r of
  all other tokens. Forward KL over k + 1 outcomes (the tokens of K one by one, the rest as one
  bucket), the same loss as divergences.topk_kl computes online:
      L = sum_{i in K} p_i (log p_i - log q_i) + p_r (log p_r - log q_r)
      dL/dz_j = q_j - p_j (j in K),   q_j (1 - p_r / q_r) (j not in K)
  p is renormalised over the k + 1 outcomes first (stored in fp16, it sums to 1 +- 1e-3).
- sampled: distinct ids drawn from the teacher with weights w_i = count_i / k (sum 1):
      L = -sum_i w_i log q_i,   dL/dz_j = q_j - w_j
  an unbiased estimate of the cross entropy to the teacher, H(p) + KL(p || q); the reported
  per-token value subtracts the cached teacher entropy H(p), so it estimates the KL.
"""

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_minitron.distill.divergences import log_softmax_
from megatron_minitron.runtime.collectives import all_reduce_sum_

TOPK, SAMPLED = "topk", "sampled"


@dataclass
class CachedTargets:
    """Cached teacher targets of N tokens, in the order of the student's flattened hidden
    states (rows of `[b*s, h]` with batch_first)."""

    kind: str
    """TOPK or SAMPLED."""
    ids: torch.Tensor
    """long [N, k]: global token ids."""
    values: torch.Tensor
    """fp32 [N, k]: top-k: the teacher's log-probabilities; sampled: weights count/k."""
    extra: torch.Tensor
    """fp32 [N]: top-k: log of the tail mass; sampled: the teacher's entropy."""
    shape: Optional[tuple] = None
    """(d0, d1) of the token grid these N = d0 * d1 tokens come from."""

    def rows(self, rows: slice) -> "CachedTargets":
        return CachedTargets(self.kind, self.ids[rows], self.values[rows], self.extra[rows])

    def to(self, device: torch.device) -> "CachedTargets":
        return CachedTargets(self.kind, self.ids.to(device), self.values.to(device),
                             self.extra.to(device), self.shape)

    def divergence(self, s: torch.Tensor, vocab_start: int, group):
        """(per-token loss [c], d loss / d s [c, v/tp]) for the scaled student logits s."""
        c, v = s.shape
        logq = log_softmax_(s, group)
        local = self.ids - vocab_start
        owned = (local >= 0) & (local < v)  # [c, k]: the ids in this rank's slice
        at = local.clamp(0, max(v - 1, 0))
        # [c, k]: log q at the cached ids, each from the rank that owns it
        logq_k = all_reduce_sum_(torch.where(owned, logq.gather(-1, at), 0.0), group)
        rows = torch.arange(c, device=s.device).unsqueeze(-1).expand_as(at)
        r, col = rows[owned], at[owned]
        if self.kind == SAMPLED:
            w = self.values
            per_token = -(w * logq_k).sum(dim=-1) - self.extra
            grad = logq.exp_()
            grad.index_put_((r, col), -w[owned], accumulate=True)
            return per_token, grad
        return self._topk(logq, logq_k, owned, r, col, group)

    def _topk(self, logq, logq_k, owned, r, col, group):
        # renormalise p over the k + 1 outcomes: [c, k], [c]
        log_total = torch.logaddexp(torch.logsumexp(self.values, dim=-1), self.extra)
        logp = self.values - log_total.unsqueeze(-1)
        logp_r = self.extra - log_total
        p, p_r = logp.exp(), logp_r.exp()
        q = logq.exp_()
        in_k = torch.zeros_like(q, dtype=torch.bool)
        in_k[r, col] = True
        q_r = all_reduce_sum_(torch.where(in_k, 0.0, q).sum(dim=-1), group)
        rest = (q_r > 0) & (p_r > 0)
        log_ratio = torch.where(rest, logp_r - q_r.clamp_min(1e-45).log(), 0.0)
        per_token = (p * (logp - logq_k)).sum(dim=-1) + torch.where(rest, p_r * log_ratio, 0.0)
        ratio = torch.where(rest, log_ratio.exp(), 0.0)  # p_r / q_r
        grad = q.mul_((1.0 - ratio).unsqueeze(-1))  # q_j (1 - p_r / q_r) off K
        grad[r, col] = logq_k.exp()[owned] - p[owned]  # q_j - p_j on K
        return per_token, grad
