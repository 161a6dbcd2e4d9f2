"""The distillation step: the LM step's contract, with a frozen teacher beside the student.

One object per student chunk, for every layout: without pipeline parallelism the teacher runs
whole beside the student; with it, each stage runs its teacher layers beside its student layers
and the stage-to-stage tensor carries both (distill/pipeline_parallel.py explains the design,
including how hidden-state terms of early stages reach the loss on the last stage)."""

from contextlib import nullcontext
from functools import partial
from typing import Dict, Mapping, Optional

import torch

from megatron_minitron.config.distill import DistillConfig
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.distill.balancing import combine
from megatron_minitron.distill.fused_output import (fused_logit_distillation_loss,
                                                    schedule_loss_scale)
from megatron_minitron.distill.hidden import EMBEDDING, HiddenStateLoss, StateCapture
from megatron_minitron.distill.losses import logit_distillation_loss
from megatron_minitron.distill.pipeline_parallel import StageChannel
from megatron_minitron.models.builder import unwrap
from megatron_minitron.models.forward import to_device
from megatron_minitron.models.layers import decoder_input, layer_numbers
from megatron_minitron.models.output_layer import (final_logit_cap, hidden_states_out,
                                                  output_weight)
from megatron_minitron.runtime.device import say_once


class KDStep:
    """Logit KD (forward KL by default) plus optional hidden-state terms, from `teacher` to the
    student chunk the schedule runs. The teacher runs under no_grad in eval mode; its logits are
    freed as soon as the loss is computed (the chunked loss keeps neither side's logits for
    backward).

    With hidden-state losses the step attaches its HiddenStateLoss (the projections of this
    stage's pairs) to the student's GPTModel: build the step before the chunks are wrapped in
    DDP and before the optimizer, so they are trained, checkpointed and restored with it."""

    def __init__(self, cfg: DistillConfig, teacher: torch.nn.Module, student: torch.nn.Module,
                 tp_group, real_vocab_size: int, device: torch.device,
                 seed: Optional[int] = None, num_microbatches: Optional[int] = None):
        self.cfg, self.teacher, self.tp_group = cfg, teacher, tp_group
        self.real_vocab_size, self.device = real_vocab_size, device
        self.num_microbatches = num_microbatches
        """Given, the fused loss writes the output weight's gradient into megatron's main_grad
        during forward, at the scale megatron's schedule applies in backward."""
        s_gpt, t_gpt = unwrap(student), unwrap(teacher)
        self.first, self.last = s_gpt.pre_process, s_gpt.post_process
        capped = final_logit_cap(s_gpt) is not None or final_logit_cap(t_gpt) is not None
        if capped and self.last and cfg.fused_output == "true":
            raise ConfigError("distill.fused_output", "a model here soft-caps its final logits "
                              "(Gemma 2), which the fused output layer does not apply",
                              "set distill.fused_output=auto or false")
        if capped and self.last and cfg.fuses_output_layer:
            say_once("minitron: distill.fused_output=auto: a model soft-caps its final logits "
                     "(Gemma 2), so the output layers make full logits and the loss is chunked")
        self.fused = cfg.fuses_output_layer and self.last and not capped
        """The last stage hands final hidden states to the loss, which makes the logits."""
        self.teacher_dtype = t_gpt.config.params_dtype
        self.hidden: Optional[HiddenStateLoss] = None
        names = []
        if cfg.uses_hidden_states:
            here = ([EMBEDDING] if self.first else []) + layer_numbers(s_gpt)
            self.hidden = HiddenStateLoss(cfg, s_gpt.config.hidden_size,
                                          t_gpt.config.hidden_size, here, seed,
                                          dtype=s_gpt.config.params_dtype).to(device)
            s_gpt.add_module(HiddenStateLoss.SUBMODULE, self.hidden)
            self.student_states = StateCapture(s_gpt, self.hidden.student_layers)
            self.teacher_states = StateCapture(t_gpt, self.hidden.teacher_layers)
            names = self.hidden.term_names
        self.loss_names = ("kd_loss", "lm_loss") + tuple(f"{n}_loss" for n in names)
        pipelined = not (self.first and self.last)
        self.channel = StageChannel(s_gpt.config.hidden_size, t_gpt.config.hidden_size,
                                    names) if pipelined else None
        self.adjust_tensor_shapes_fn = self.channel.adjust_tensor_shapes if pipelined else None

    def forward_step(self, data_iterator, model):
        batch = to_device(next(data_iterator), self.device)
        carried: Dict[str, torch.Tensor] = {}
        if not self.first:  # the schedule gave the student the widened tensor: share it out
            s_gpt = unwrap(model)
            student_in, teacher_in, carried = self.channel.split(decoder_input(s_gpt))
            s_gpt.set_input_tensor(student_in)
            unwrap(self.teacher).set_input_tensor(teacher_in.to(self.teacher_dtype))
        t_gpt, s_gpt = unwrap(self.teacher), unwrap(model)
        with torch.no_grad(), self._outputs(t_gpt):
            teacher_out = self.teacher(batch["tokens"], batch["position_ids"], None)
        with self._outputs(s_gpt):
            student_out = model(batch["tokens"], batch["position_ids"], None)
        terms = {} if self.hidden is None else self.hidden(
            self.student_states.pop(), self.teacher_states.pop(), batch["loss_mask"], "sum")
        if not self.last:  # [s, b, h_s], [s, b, h_t] -> [s, b, h_s + h_t + n]
            return self.channel.pack(student_out, teacher_out, carried, terms), None
        if self.hidden is not None:  # every term: from an earlier stage, or from this one
            terms = {n: sum(d[n] for d in (carried, terms) if n in d)
                     for n in self.hidden.term_names}
        return student_out, partial(self._loss, batch, teacher_out, terms, s_gpt, t_gpt)

    def _outputs(self, gpt):
        """Fused: the model returns final hidden states `[b, s, h]`, not logits."""
        return hidden_states_out(gpt) if self.fused else nullcontext()

    def _loss(self, batch: Dict[str, torch.Tensor], teacher_out,
              terms: Mapping[str, torch.Tensor], s_gpt, t_gpt, student_out):
        common = dict(loss_mask=batch["loss_mask"], labels=batch["labels"],
                      real_vocab_size=self.real_vocab_size, tp_group=self.tp_group,
                      reduction="sum", batch_first=True)
        if self.fused:  # student_out, teacher_out: final hidden states [b, s, h]
            out = fused_logit_distillation_loss(student_out, output_weight(s_gpt), teacher_out,
                                                output_weight(t_gpt), self.cfg,
                                                grad_scale=schedule_loss_scale(
                                                    batch["loss_mask"], self.num_microbatches),
                                                **common)
        else:  # logits [b, s, v/tp]
            out = logit_distillation_loss(student_out, teacher_out, self.cfg, **common)
        parts = combine(out, terms, self.cfg)
        n = out.num_tokens.float()
        lm = out.ce  # the student's LM loss, from the same chunked pass over its logits
        report = {"kd_loss": torch.stack([out.kd.detach(), n]),
                  "lm_loss": torch.stack([lm.detach(), n])}
        for name, value in terms.items():  # unweighted, per token
            report[f"{name}_loss"] = torch.stack([value.detach().float(), n])
        return parts["total"], out.num_tokens, report
