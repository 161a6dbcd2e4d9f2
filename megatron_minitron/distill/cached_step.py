"""The distillation step with no teacher in memory: the teacher's targets come from a cache
(distill/teacher_cache.py), read by the batch's sample keys; the loss is the fused output-layer
loss (distill/fused_output.py) with the cached targets in place of the teacher's logits.

Under pipeline parallelism only the last stage reads the cache; the other stages are the LM
step's (the stage-to-stage tensor is the student's alone)."""

from functools import partial

import torch

from megatron_minitron.config.distill import DistillConfig
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.distill.fused_output import (fused_logit_distillation_loss,
                                                    schedule_loss_scale)
from megatron_minitron.distill.teacher_cache import TeacherCache
from megatron_minitron.models.builder import unwrap
from megatron_minitron.models.output_layer import (final_logit_cap, hidden_states_out,
                                                  output_weight)


class CachedKDStep:
    """KDStep's contract (forward_step, loss_names) with the teacher read from `cache`."""

    loss_names = ("kd_loss", "lm_loss")
    adjust_tensor_shapes_fn = None

    def __init__(self, cfg: DistillConfig, cache: TeacherCache, student: torch.nn.Module,
                 tp_group, real_vocab_size: int, device: torch.device, num_microbatches=None):
        self.cfg, self.cache, self.tp_group = cfg, cache, tp_group
        self.real_vocab_size, self.device = real_vocab_size, device
        self.num_microbatches = num_microbatches
        self.kind = cache.estimator(cfg.teacher_cache_estimator)
        self.last = unwrap(student).post_process
        if self.last and final_logit_cap(unwrap(student)) is not None:
            raise ConfigError("distill.teacher_cache", "the student soft-caps its final logits "
                              "(Gemma 2), which the cached loss's fused output layer does not "
                              "apply", "distil online from the teacher (drop teacher_cache)")

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        gpt = unwrap(model)
        tokens = batch["tokens"].to(self.device)
        positions = batch["position_ids"].to(self.device)
        if not self.last:
            return model(tokens, positions, None), None
        targets = self.cache.targets(batch, self.kind).to(self.device)
        with hidden_states_out(gpt):  # [b, s, h]
            hidden = model(tokens, positions, None)
        return hidden, partial(self._loss, batch, targets, gpt)

    def _loss(self, batch, targets, gpt, hidden):
        mask = batch["loss_mask"].to(self.device)
        out = fused_logit_distillation_loss(
            hidden, output_weight(gpt), targets, None, self.cfg, loss_mask=mask,
            labels=batch["labels"].to(self.device), real_vocab_size=self.real_vocab_size,
            tp_group=self.tp_group, reduction="sum", batch_first=True,
            grad_scale=schedule_loss_scale(mask, self.num_microbatches))
        n = out.num_tokens.float()
        report = {"kd_loss": torch.stack([out.kd.detach(), n]),
                  "lm_loss": torch.stack([out.ce.detach(), n])}
        return out.loss, out.num_tokens, report
