"""Per-token log-probabilities and greedy predictions of token sequences, under any TP/PP/DP.

What an lm-eval model needs from ours (eval/lm_eval_adapter.py): for each sequence, the
log-probability of every next token and the model's argmax at every position. The forward pass
is megatron's schedule (forward-only, `collect_non_loss_data`), so pipeline stages pass
activations as in training; the logits stay vocab-parallel: the log-probability is megatron's
vocab_parallel_cross_entropy and the argmax a max over the TP ranks' shards. The last stage
broadcasts the results over the PP group, so every rank returns the same lists. DP ranks do the
same work redundantly (lm-eval's requests are not split over them).

Log-probabilities are over the padded vocabulary, like the LM loss of training and of
eval/perplexity.py; the argmax is over real token ids only (ids >= vocab_size never win).
"""

from functools import partial
from typing import List, Sequence, Tuple

import torch
import torch.distributed as dist


def _gather_argmax(logits: torch.Tensor, vocab_size: int, ctx) -> torch.Tensor:
    """Global argmax over vocab-parallel logits [b, s, v/tp] -> [b, s] token ids."""
    local_v = logits.shape[-1]
    start = ctx.tp_rank * local_v
    ids = torch.arange(start, start + local_v, device=logits.device)
    logits = logits.masked_fill(ids >= vocab_size, float("-inf"))
    best, arg = logits.max(dim=-1)  # [b, s] each
    arg = arg + start
    if ctx.tp_size == 1:
        return arg
    bests = [torch.empty_like(best) for _ in range(ctx.tp_size)]
    args = [torch.empty_like(arg) for _ in range(ctx.tp_size)]
    dist.all_gather(bests, best.contiguous(), group=ctx.tp_group)
    dist.all_gather(args, arg.contiguous(), group=ctx.tp_group)
    # [tp, b, s] -> [b, s]: the first rank holding the max wins, as torch.argmax picks the first
    winner = torch.stack(bests).argmax(dim=0, keepdim=True)
    return torch.stack(args).gather(0, winner).squeeze(0)


def _score_func(targets: torch.Tensor, vocab_size: int, ctx, logits: torch.Tensor,
                non_loss_data: bool = True):
    from megatron.core.tensor_parallel import vocab_parallel_cross_entropy

    # [b, s, v/tp] -> [s, b, v/tp] as megatron's cross entropy expects
    nll = vocab_parallel_cross_entropy(logits.transpose(0, 1).float().contiguous(),
                                       targets.transpose(0, 1).contiguous())
    return -nll.transpose(0, 1).double(), _gather_argmax(logits.float(), vocab_size, ctx)


def _step(batches: List[Tuple[torch.Tensor, torch.Tensor]], vocab_size: int, ctx,
          data_iterator, model):
    tokens, targets = (t.to(ctx.device) for t in batches[next(data_iterator)])
    b, s = tokens.shape
    position_ids = torch.arange(s, device=ctx.device).expand(b, -1)
    output = model(tokens, position_ids, None)  # last stage: logits [b, s, v/tp]
    return output, partial(_score_func, targets, vocab_size, ctx)


def score_sequences(chunks: List[torch.nn.Module], sequences: Sequence[Sequence[int]],
                    ctx, vocab_size: int, micro_batch_size: int, pad_id: int
                    ) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """For each sequence of n >= 2 ids, (logprob [n-1] fp64 of ids[1:] given the prefix,
    argmax [n-1] long: the greedy next token after each prefix). Collective over all ranks;
    every rank passes the same sequences and gets the same results."""
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if any(len(q) < 2 for q in sequences):
        raise ValueError("every sequence needs at least 2 tokens")
    # one shape for every micro-batch: the pipeline's send/recv buffers are sized once
    s = max(len(q) for q in sequences) - 1
    n = len(sequences)
    rows = -(-n // micro_batch_size) * micro_batch_size
    ids = torch.full((rows, s + 1), pad_id, dtype=torch.long)
    for i, q in enumerate(sequences):
        ids[i, :len(q)] = torch.tensor(list(q), dtype=torch.long)
    batches = [(ids[i:i + micro_batch_size, :-1], ids[i:i + micro_batch_size, 1:])
               for i in range(0, rows, micro_batch_size)]
    for c in chunks:
        c.eval()
    iters = [iter(range(len(batches))) for _ in chunks]
    with torch.no_grad():
        out = get_forward_backward_func()(
            forward_step_func=partial(_step, batches, vocab_size, ctx),
            data_iterator=iters if len(chunks) > 1 else iters[0],
            model=chunks if len(chunks) > 1 else chunks[0],
            num_microbatches=len(batches), seq_length=s, micro_batch_size=micro_batch_size,
            forward_only=True, collect_non_loss_data=True)
    logprob = torch.zeros(rows, s, dtype=torch.float64)
    argmax = torch.zeros(rows, s, dtype=torch.long)
    if ctx.is_last_stage:
        logprob = torch.cat([lp.cpu() for lp, _ in out])
        argmax = torch.cat([am.cpu() for _, am in out])
    if ctx.pp_size > 1:
        src = dist.get_global_rank(ctx.pp_group, ctx.pp_size - 1)
        logprob, argmax = logprob.to(ctx.device), argmax.to(ctx.device)
        dist.broadcast(logprob, src, group=ctx.pp_group)
        dist.broadcast(argmax, src, group=ctx.pp_group)
        logprob, argmax = logprob.cpu(), argmax.cpu()
    return [(logprob[i, :len(q) - 1], argmax[i, :len(q) - 1]) for i, q in enumerate(sequences)]
