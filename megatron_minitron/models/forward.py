"""Running a model: batch-to-device, the masked token loss and the forward-only pass through
megatron's schedule (any PP/VPP), shared by importance, evaluation and the training steps."""

from functools import partial
from typing import Callable, Dict, Iterable, List, Optional

import torch

from megatron_minitron.config.errors import ConfigError

Batch = Dict[str, torch.Tensor]
MakeBatches = Callable[[], Iterable[Batch]]
"""Returns a fresh iterable of this DP rank's micro-batches: tokens, labels, position_ids
(int64 [b, s]) and loss_mask (float [b, s]); every call yields the same batches."""


def to_device(batch: Dict[str, torch.Tensor], device: torch.device) -> Dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v
            for k, v in batch.items()}


def masked_token_loss(loss_mask: torch.Tensor, per_token_loss: torch.Tensor):
    """Sum of the masked per-token losses, with the token count, in megatron's 3-tuple form."""
    mask = loss_mask.reshape(-1).float()
    loss = torch.sum(per_token_loss.reshape(-1).float() * mask)
    num_tokens = mask.sum().to(torch.int)
    report = torch.stack([loss.detach(), num_tokens.detach().float()])
    return loss, num_tokens, {"lm_loss": report}


def _forward_step(device: torch.device, on_batch: Optional[Callable[[Batch], None]],
                  data_iterator, model):
    batch = to_device(next(data_iterator), device)
    if on_batch is not None:  # every stage runs its micro-batches in order: set, then forward
        on_batch(batch)
    output = model(batch["tokens"], batch["position_ids"], None, labels=batch["labels"])
    return output, partial(masked_token_loss, batch["loss_mask"])


def _counting(batches: List[Batch], count: Optional[Callable[[int], None]]):
    for b in batches:
        if count is not None:  # a sample that is all padding is no sample
            count(int((b["loss_mask"] > 0).any(dim=1).sum()))
        yield b


def forward_pass(chunks: List[torch.nn.Module], make_batches: MakeBatches, ctx, field: str,
                 on_batch: Optional[Callable[[Batch], None]] = None,
                 count_samples: Optional[Callable[[int], None]] = None) -> torch.Tensor:
    """One forward-only pass through megatron's schedule (any PP/VPP). Returns this rank's
    [masked loss sum, token count] in fp64: nonzero on last-stage TP rank 0 only.
    field: the config field that sets how many samples there are (named when none came).
    on_batch(batch) runs before each micro-batch's forward on every stage; count_samples(n)
    gets each micro-batch's count of samples with a real token, on first-stage TP rank 0."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    batches = list(make_batches())
    if not batches:
        raise ConfigError(field, "this rank got no batches",
                          "use at least micro_batch_size x data-parallel size samples")
    b, s = batches[0]["tokens"].shape
    owner = count_samples if (ctx.tp_rank == 0 and ctx.pp_rank == 0) else None
    # VPP: one iterator per chunk; only the first counts samples
    iters = [_counting(batches, owner if i == 0 else None) for i in range(len(chunks))]
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=partial(_forward_step, ctx.device, on_batch),
            data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches), seq_length=s, micro_batch_size=b,
            forward_only=True)
    local = torch.zeros(2, dtype=torch.float64)
    if ctx.is_last_stage and ctx.tp_rank == 0:
        for report in out:
            local += report["lm_loss"].double().cpu()
    return local
