"""Weighting of the distillation terms into one loss.

"auto" (Minitron): each hidden/embedding term is multiplied by |logit loss| / |term|, computed
on detached values (logit loss = kd_weight * kd + ce_weight * ce, i.e. the KD term with the
default ce_weight=0), so it contributes as much as the logit term while its gradient direction is
its own. "fixed": DistillConfig.hidden_weight / embedding_weight.
"""

from typing import Dict, Mapping

import torch

from megatron_minitron.config.distill import DistillConfig
from megatron_minitron.distill.losses import LogitLoss

_EPS = 1e-12


def term_weights(logit_term: torch.Tensor, terms: Mapping[str, torch.Tensor],
                 cfg: DistillConfig) -> Dict[str, torch.Tensor]:
    """{name: detached weight} for the intermediate terms."""
    weights = {}
    for name, value in terms.items():
        if cfg.balancing == "auto":
            weights[name] = logit_term.detach().abs() / value.detach().abs().clamp(min=_EPS)
        else:
            w = cfg.embedding_weight if name == "embedding" else cfg.hidden_weight
            weights[name] = torch.tensor(w, dtype=value.dtype, device=value.device)
    return weights


def combine(logit: LogitLoss, terms: Mapping[str, torch.Tensor],
            cfg: DistillConfig) -> Dict[str, torch.Tensor]:
    """{"kd", "ce"?, <term names>..., "total"}. "total" is the differentiable loss; the other
    entries are their detached weighted contributions (they add up to total), for logging."""
    out = {"kd": cfg.kd_weight * logit.kd}
    if cfg.ce_weight > 0:
        out["ce"] = cfg.ce_weight * logit.ce
    total = logit.loss
    for name, w in term_weights(logit.loss, terms, cfg).items():
        weighted = terms[name] * w
        out[name] = weighted.detach()
        total = total + weighted
    out["total"] = total
    return out
