"""Hidden-state distillation: cosine or MSE between paired teacher/student activations.

States are `[s, b, h]` with the full hidden width on every rank: without sequence parallelism
megatron-core keeps the residual stream replicated over the TP group, so each TP rank computes
the same loss and its projections get the same gradient (they are replicated, not sharded).
Under sequence parallelism the states are `[s/tp, b, h]` sequence shards; the loss then covers
the rank's own tokens only and the caller must pass the matching `[b, s/tp]` slice of the loss
mask and sum the per-rank sums over TP (not done here).
"""

from typing import Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_minitron.config.distill import DistillConfig

EMBEDDING = 0
"""Layer number of the embedding output (the input of layer 1)."""


class HiddenStateLoss(torch.nn.Module):
    """Owns one projection student_h -> teacher_h per compared student layer (a bias-free
    `nn.Linear` when the widths differ, nothing when they match). It is trained with the
    student and saved in its checkpoints; export drops it (it is not part of the model)."""

    def __init__(self, cfg: DistillConfig, student_hidden_size: int, teacher_hidden_size: int):
        super().__init__()
        self.kind = cfg.hidden_loss
        self.pairs: List[Tuple[int, int]] = [(int(t), int(s)) for t, s in cfg.layer_pairs]
        if cfg.embedding_loss:
            self.pairs.insert(0, (EMBEDDING, EMBEDDING))
        self.projections = torch.nn.ModuleDict()
        if student_hidden_size != teacher_hidden_size:
            for _, s in self.pairs:
                self.projections[self.term_name(s)] = torch.nn.Linear(
                    student_hidden_size, teacher_hidden_size, bias=False)

    @staticmethod
    def term_name(student_layer: int) -> str:
        return "embedding" if student_layer == EMBEDDING else f"hidden_{student_layer}"

    @property
    def teacher_layers(self) -> List[int]:
        """Teacher layer outputs to capture (0: the embedding output)."""
        return [t for t, _ in self.pairs]

    @property
    def student_layers(self) -> List[int]:
        """Student layer outputs to capture (0: the embedding output)."""
        return [s for _, s in self.pairs]

    def forward(self, student_states: Mapping[int, torch.Tensor],
                teacher_states: Mapping[int, torch.Tensor],
                loss_mask: Optional[torch.Tensor] = None,
                reduction: str = "sum") -> Dict[str, torch.Tensor]:
        """{term name: fp32 scalar} for each pair. States map a layer number (0 = embedding
        output, l = output of layer l) to `[s, b, h]`; loss_mask is megatron's `[b, s]`.
        reduction: "sum" or "mean" over masked tokens (match the logit loss's)."""
        terms = {}
        for t_layer, s_layer in self.pairs:
            name = self.term_name(s_layer)
            student = student_states[s_layer]
            if name in self.projections:
                proj = self.projections[name]
                student = proj(student.to(proj.weight.dtype))  # [s, b, h_s] -> [s, b, h_t]
            per_token = self.per_token_loss(student.float(),
                                            teacher_states[t_layer].detach().float())
            terms[name] = _reduce(per_token, loss_mask, reduction)
        return terms

    def per_token_loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """[s, b, h] x 2 -> [s, b]."""
        if self.kind == "cosine":
            return 1.0 - F.cosine_similarity(student, teacher, dim=-1, eps=1e-8)
        return (student - teacher).pow(2).mean(dim=-1)


def _reduce(per_token: torch.Tensor, loss_mask: Optional[torch.Tensor], reduction: str):
    if loss_mask is None:
        return per_token.sum() if reduction == "sum" else per_token.mean()
    mask = loss_mask.transpose(0, 1).float()  # [b, s] -> [s, b]
    total = (per_token * mask).sum()
    return total if reduction == "sum" else total / mask.sum().clamp(min=1.0)
