"""The LM step: what one micro-batch contributes to the loss. The loop is shared; steps vary."""

from functools import partial
from typing import Optional

import torch

from megatron_minitron.distill.fused_output import fused_cross_entropy_loss, schedule_loss_scale
from megatron_minitron.models.builder import unwrap
from megatron_minitron.models.forward import masked_token_loss, to_device
from megatron_minitron.models.layers import output_layer
from megatron_minitron.models.output_layer import (final_logit_cap, hidden_states_out,
                                                  output_weight)
from megatron_minitron.runtime.device import say_once


class LMStep:
    """Next-token cross entropy. `forward_step` is megatron's forward_step_func contract.

    fused (the default): the last stage's GPTModel hands its final hidden states to a loss
    fused with its output layer (distill/fused_output.py), so no `[tokens, vocab]` logits are
    made in forward or backward; else GPTModel's own output layer and cross entropy."""

    loss_names = ("lm_loss",)
    adjust_tensor_shapes_fn = None

    def __init__(self, device: torch.device = torch.device("cpu"), fused: bool = True,
                 num_microbatches: Optional[int] = None):
        self.device, self.fused = device, fused
        self.num_microbatches = num_microbatches
        """Given, the fused loss writes the output weight's gradient into megatron's main_grad
        during forward, at the scale megatron's schedule applies (as KDStep does)."""

    def forward_step(self, data_iterator, model):
        batch = to_device(next(data_iterator), self.device)
        gpt = unwrap(model)
        if self.fused and gpt.post_process and final_logit_cap(gpt) is not None:
            say_once("minitron: train.fused_lm_loss: this model soft-caps its final logits "
                     "(Gemma 2), so its output layer and cross entropy run unfused")
            self.fused = False
        if not (self.fused and gpt.post_process):
            output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
            return output, partial(masked_token_loss, batch["loss_mask"])
        with hidden_states_out(gpt):  # [b, s, h]
            hidden = model(batch["tokens"], batch["position_ids"], None)
        return hidden, partial(self._fused_loss, batch, gpt)

    def _fused_loss(self, batch, gpt, hidden):
        scale = schedule_loss_scale(batch["loss_mask"], self.num_microbatches)
        # the vocabulary shards' group: the output layer's own (size 1 without TP)
        out = fused_cross_entropy_loss(hidden, output_weight(gpt), batch["labels"],
                                       batch["loss_mask"], output_layer(gpt).tp_group,
                                       batch_first=True, grad_scale=scale)
        report = torch.stack([out.loss.detach(), out.num_tokens.detach().float()])
        return out.loss, out.num_tokens.to(torch.int), {"lm_loss": report}
