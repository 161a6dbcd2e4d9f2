"""The LM step: what one micro-batch contributes to the loss. The loop is shared; steps vary."""

from functools import partial
from typing import Dict

import torch


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of the masked per-token losses, with the token count, in megatron's 3-tuple form."""
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(per_token_loss.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.detach().float()])
    return loss, num_tokens, {"lm_loss": report}


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


class LMStep:
    """Next-token cross entropy. `forward_step` is megatron's forward_step_func contract."""

    loss_names = ("lm_loss",)
    adjust_tensor_shapes_fn = None

    def __init__(self, device: torch.device = torch.device("cpu")):
        self.device = device

    def forward_step(self, data_iterator, model):
        batch = to_device(next(data_iterator), self.device)
        output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
        return output, partial(masked_token_loss, batch["loss_mask"])
