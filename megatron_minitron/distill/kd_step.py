"""The distillation step: the LM step's contract, with a frozen teacher beside the student."""

from functools import partial
from typing import Dict

import torch

from megatron_minitron.config.distill import DistillConfig
from megatron_minitron.distill.balancing import combine
from megatron_minitron.distill.losses import logit_distillation_loss
from megatron_minitron.training.lm_step import to_device


class KDStep:
    """Logit KD (forward KL by default) from `teacher` to the student chunk the schedule runs.
    The teacher runs under no_grad in eval mode; its logits are freed as soon as the loss is
    computed (the chunked loss keeps neither side's logits for backward)."""

    loss_names = ("kd_loss", "lm_loss")

    def __init__(self, cfg: DistillConfig, teacher: torch.nn.Module, tp_group,
                 real_vocab_size: int, device: torch.device):
        self.cfg, self.teacher, self.tp_group = cfg, teacher, tp_group
        self.real_vocab_size, self.device = real_vocab_size, device

    def forward_step(self, data_iterator, model):
        batch = to_device(next(data_iterator), self.device)
        with torch.no_grad():
            teacher_logits = self.teacher(batch["tokens"], batch["position_ids"], None)
        student_logits = model(batch["tokens"], batch["position_ids"], None)  # [b, s, v/tp]
        return student_logits, partial(self._loss, batch, teacher_logits)

    def _loss(self, batch: Dict[str, torch.Tensor], teacher_logits, student_logits):
        from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

        out = logit_distillation_loss(
            student_logits, teacher_logits, self.cfg, loss_mask=batch["loss_mask"],
            labels=batch["labels"], real_vocab_size=self.real_vocab_size,
            tp_group=self.tp_group, reduction="sum", batch_first=True)
        parts = combine(out, {}, self.cfg)
        n = out.num_tokens.float()
        if out.ce is not None:
            lm = out.ce
        else:  # the student's LM loss, for the log only
            with torch.no_grad():
                # [b, s, v/tp] -> [s, b, v/tp], as megatron's cross entropy expects
                ce = vocab_parallel_cross_entropy(
                    student_logits.detach().transpose(0, 1).float().contiguous(),
                    batch["labels"].transpose(0, 1).contiguous())
                lm = (ce.transpose(0, 1) * batch["loss_mask"]).sum()
        report = {"kd_loss": torch.stack([out.kd.detach(), n]),
                  "lm_loss": torch.stack([lm.detach(), n])}
        return parts["total"], out.num_tokens, report
