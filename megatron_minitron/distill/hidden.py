"""Hidden-state distillation: cosine or MSE between paired teacher/student activations.

States are `[s, b, h]` with the full hidden width on every rank: without sequence parallelism
megatron-core keeps the residual stream replicated over the TP group, so each TP rank computes
the same loss and its projections get the same gradient (they are replicated, not sharded).
Under sequence parallelism the states are `[s/tp, b, h]` sequence shards; the loss then covers
the rank's own tokens only and the caller must pass the matching `[b, s/tp]` slice of the loss
mask and sum the per-rank sums over TP (not done here: training/lm.py refuses hidden-state
losses with sequence parallelism).
"""

import math
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from megatron_minitron.config.distill import DistillConfig
from megatron_minitron.models.hooks import HookSet
from megatron_minitron.models.layers import decoder_layers, embedding

EMBEDDING = 0
"""Layer number of the embedding output (the input of layer 1)."""


class HiddenStateLoss(torch.nn.Module):
    """Owns one projection student_h -> teacher_h per compared student layer (a bias-free
    `nn.Linear` when the widths differ, nothing when they match). The distillation step attaches
    it to the student's GPTModel as the submodule `SUBMODULE`, so megatron's DDP, optimizer and
    dist_checkpointing treat the projections as student parameters (trained, saved, restored);
    HF export and pruning build a plain GPTModel, which does not ask for those keys.

    student_layers: the student layers this pipeline stage owns (0: embedding output); only
    their pairs get projections and terms here. None: all pairs (no pipeline).
    seed: initialise each projection from its own generator seeded with (seed, student layer),
    so every layout starts from the same projections; None: torch's default init and RNG.
    """

    SUBMODULE = "distill_hidden"

    def __init__(self, cfg: DistillConfig, student_hidden_size: int, teacher_hidden_size: int,
                 student_layers: Optional[Iterable[int]] = None, seed: Optional[int] = None,
                 dtype: Optional[torch.dtype] = None):
        super().__init__()
        self.kind = cfg.hidden_loss
        self.pairs: List[Tuple[int, int]] = [(int(t), int(s)) for t, s in cfg.layer_pairs]
        if cfg.embedding_loss:
            self.pairs.insert(0, (EMBEDDING, EMBEDDING))
        here = None if student_layers is None else set(student_layers)
        self.local_pairs = [(t, s) for t, s in self.pairs if here is None or s in here]
        self.projections = torch.nn.ModuleDict()
        if student_hidden_size != teacher_hidden_size:
            for _, s in self.local_pairs:
                proj = torch.nn.Linear(student_hidden_size, teacher_hidden_size, bias=False)
                if seed is not None:
                    g = torch.Generator().manual_seed(int(seed) * 1009 + s)
                    with torch.no_grad():  # nn.Linear's own init, from a layout-free generator
                        torch.nn.init.kaiming_uniform_(proj.weight, a=math.sqrt(5), generator=g)
                self.projections[self.term_name(s)] = proj.to(dtype or proj.weight.dtype)

    @property
    def term_names(self) -> List[str]:
        """All terms, over every pipeline stage, in a fixed order."""
        return [self.term_name(s) for _, s in self.pairs]

    @staticmethod
    def term_name(student_layer: int) -> str:
        return "embedding" if student_layer == EMBEDDING else f"hidden_{student_layer}"

    @property
    def teacher_layers(self) -> List[int]:
        """Teacher layer outputs to capture on this stage (0: the embedding output)."""
        return [t for t, _ in self.local_pairs]

    @property
    def student_layers(self) -> List[int]:
        """Student layer outputs to capture on this stage (0: the embedding output)."""
        return [s for _, s in self.local_pairs]

    def forward(self, student_states: Mapping[int, torch.Tensor],
                teacher_states: Mapping[int, torch.Tensor],
                loss_mask: Optional[torch.Tensor] = None,
                reduction: str = "sum") -> Dict[str, torch.Tensor]:
        """{term name: fp32 scalar} for each pair of this stage. States map a layer number (0 = embedding
        output, l = output of layer l) to `[s, b, h]`; loss_mask is megatron's `[b, s]`.
        reduction: "sum" or "mean" over masked tokens (match the logit loss's)."""
        terms = {}
        for t_layer, s_layer in self.local_pairs:
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


class StateCapture(HookSet):
    """Forward hooks on one GPTModel that keep the outputs of chosen layers (0: the embedding
    output, l: the output of TransformerLayer l, global 1-based) that this chunk holds, for the
    hidden-state losses; `pop` hands them over once per micro-batch. The hooks stay for the
    life of the distillation step (HookSet.__exit__ removes them)."""

    def __init__(self, gpt: torch.nn.Module, layers: Iterable[int]):
        self.states: Dict[int, torch.Tensor] = {}
        self.handles = []
        wanted = set(layers)
        if EMBEDDING in wanted and gpt.pre_process:
            self.handles.append(embedding(gpt).register_forward_hook(self._keep(EMBEDDING)))
        for layer in decoder_layers(gpt):
            if layer.layer_number in wanted:
                self.handles.append(layer.register_forward_hook(self._keep(layer.layer_number)))

    def _keep(self, number: int):
        def hook(module, args, output):
            # TransformerLayer returns (hidden_states, context); the embedding a tensor
            self.states[number] = output[0] if isinstance(output, tuple) else output
        return hook

    def pop(self) -> Dict[int, torch.Tensor]:
        states, self.states = self.states, {}
        return states
