"""Held-out LM loss and perplexity of one of our checkpoints, under any TP/PP/DP layout.

The numbers are megatron's LM loss (the mean token cross-entropy the training loop reports as
`lm_loss`, over the model's padded vocabulary) and perplexity = exp(loss), summed over every
predicted token of every DP rank. The forward passes are models.forward.forward_pass (the
one forward-only loop, megatron's pipeline schedule); this module only makes batches and sums.

Usage from a plain process (one rank, or each rank of a torchrun job):

    ctx = runtime.distributed.initialize(parallel, runtime)
    tok = checkpoint_tokenizer(ckpt)                       # the one the checkpoint recorded
    batches = heldout_batches(tok, demo_heldout_text(20_000), seq_length=256,
                              micro_batch_size=4, dp_rank=ctx.dp_rank, dp_size=ctx.dp_size)
    result = evaluate_checkpoint(ckpt, batches, ctx, runtime, parallel)   # same on every rank
    result.loss, result.perplexity, result.tokens

or, on a run's validation/test split: `split_batches(cfg.data, tok, "valid", num_samples,
micro_batch_size, ctx, seed)` in place of heldout_batches. Models already in memory (a list of
chunks) go straight to `evaluate(chunks, batches, ctx)`.

Batches are lists of this DP rank's micro-batches {tokens, labels, position_ids: long [b, s];
loss_mask: float [b, s]}. Every rank gets the same number of full micro-batches (megatron's
pipeline schedule needs equal shapes); padding samples carry loss_mask 0 and count for nothing.
"""

import dataclasses
import math
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_minitron.config.data import DataConfig
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
from megatron_minitron.data.tokenizer import Tokenizer

Batch = Dict[str, torch.Tensor]


@dataclasses.dataclass
class EvalResult:
    """Mean LM loss over `tokens` predicted tokens, and its exponential."""

    loss: float
    """Mean token cross-entropy in nats."""
    perplexity: float
    """exp(loss)."""
    tokens: int
    """Tokens whose prediction was scored (over all DP ranks)."""

    def to_dict(self) -> Dict[str, float]:
        return dataclasses.asdict(self)


def _rank_share(samples: torch.Tensor, mask: torch.Tensor, micro_batch_size: int,
                dp_rank: int, dp_size: int) -> List[Batch]:
    """This DP rank's micro-batches, in Megatron's sampler order: of each group of
    micro_batch_size * dp_size samples, rank r takes the r-th block."""
    s = samples.shape[1] - 1
    position_ids = torch.arange(s).expand(micro_batch_size, -1).contiguous()
    group = micro_batch_size * dp_size
    out = []
    for start in range(dp_rank * micro_batch_size, samples.shape[0], group):
        rows = slice(start, start + micro_batch_size)
        out.append({"tokens": samples[rows, :-1].contiguous(),
                    "labels": samples[rows, 1:].contiguous(),
                    "loss_mask": mask[rows].contiguous(), "position_ids": position_ids})
    return out


def heldout_batches(tokenizer: Tokenizer, text: str, seq_length: int, micro_batch_size: int,
                    num_samples: Optional[int] = None, dp_rank: int = 0, dp_size: int = 1,
                    field: str = "eval.heldout_chars") -> List[Batch]:
    """Non-overlapping windows over a text: sample i reads ids[i*s : i*s + s] and predicts
    ids[i*s + 1 : i*s + s + 1], so every token but the first is predicted once (the last window
    is padded and masked). num_samples caps the windows (None: the whole text)."""
    ids = tokenizer.encode(text)
    n = math.ceil((len(ids) - 1) / seq_length) if len(ids) > 1 else 0
    if num_samples is not None:
        n = min(n, num_samples)
    if n == 0:
        raise ConfigError(field, f"the text gives no token to predict ({len(ids)} tokens)",
                          "evaluate on a longer text")
    group = micro_batch_size * dp_size
    padded = math.ceil(n / group) * group
    samples = torch.full((padded, seq_length + 1), tokenizer.eod, dtype=torch.long)
    mask = torch.zeros(padded, seq_length)
    for i in range(n):
        window = torch.tensor(ids[i * seq_length: i * seq_length + seq_length + 1])
        samples[i, :len(window)] = window
        mask[i, :len(window) - 1] = 1.0
    return _rank_share(samples, mask, micro_batch_size, dp_rank, dp_size)


def split_batches(data: DataConfig, tokenizer: Tokenizer, split: str, num_samples: int,
                  micro_batch_size: int, ctx, seed: int) -> List[Batch]:
    """The first num_samples samples (at most the split's size, rounded down to whole
    micro_batch_size x DP groups) of a run's "valid" or "test" split, as training sees them."""
    from megatron_minitron.data.datasets import SPLITS, build_datasets
    from megatron_minitron.data.loader import calibration_batches

    if split not in SPLITS:
        raise ConfigError("eval.splits", f"unknown split {split!r}", f"use some of {SPLITS}")
    wanted = [0, 0, 0]
    wanted[SPLITS.index(split)] = num_samples
    barrier = dist.barrier if dist.is_initialized() else None
    dataset = build_datasets(data, tokenizer, wanted, seed, is_rank0=ctx.rank == 0,
                             barrier=barrier)[SPLITS.index(split)]
    if dataset is None or len(dataset) == 0:
        raise ConfigError("data.split", f"the {split} split of {data.split!r} is empty",
                          f"give the {split} split a non-zero share, or drop it from "
                          "eval.splits")
    group = micro_batch_size * ctx.dp_size
    n = min(num_samples, len(dataset)) // group * group
    if n == 0:
        raise ConfigError("eval.num_samples", f"{num_samples} samples make no full group of "
                          f"micro_batch_size x DP = {group}", f"use at least {group}")
    return list(calibration_batches(dataset, n, micro_batch_size, ctx.dp_rank, ctx.dp_size,
                                    field="eval.num_samples"))


def evaluate(chunks: List[torch.nn.Module], batches: List[Batch], ctx) -> EvalResult:
    """Loss and perplexity of the model in `chunks` over every rank's batches; the same
    EvalResult on every rank."""
    from megatron_minitron.models.forward import forward_pass
    from megatron_minitron.runtime.collectives import all_reduce_sum

    for c in chunks:
        c.eval()
    # [loss sum, tokens] fp64
    total = forward_pass(chunks, lambda: iter(batches), ctx, "eval.num_samples")
    all_reduce_sum([total], ctx)
    tokens = int(total[1])
    if tokens == 0:
        raise ConfigError("eval.num_samples", "no token was scored", "evaluate more samples")
    loss = float(total[0] / tokens)
    return EvalResult(loss=loss, perplexity=math.exp(loss), tokens=tokens)


def checkpoint_tokenizer(checkpoint: str) -> Tokenizer:
    """The tokenizer a checkpoint recorded (bytes when it recorded none)."""
    from megatron_minitron.checkpoint.dist import read_header
    from megatron_minitron.data.tokenizer import ByteTokenizer, tokenizer_from_description

    header = read_header(checkpoint)
    return tokenizer_from_description(header.tokenizer) if header.tokenizer else ByteTokenizer()


def layout_of(ctx) -> ParallelConfig:
    """The ParallelConfig of an initialised layout (for callers that hold only the context)."""
    return ParallelConfig(tensor_model_parallel_size=ctx.tp_size,
                          pipeline_model_parallel_size=ctx.pp_size)


def evaluate_checkpoint(checkpoint: str, batches: List[Batch], ctx, runtime: RuntimeConfig,
                        parallel: Optional[ParallelConfig] = None) -> EvalResult:
    """Build the checkpoint's model for this layout (parallel defaults to ctx's TP/PP), load it
    and evaluate it; the chunks are freed before returning. Collective: every rank calls it."""
    from megatron_minitron.checkpoint.dist import load, read_header
    from megatron_minitron.models.builder import build_model

    model = read_header(checkpoint).model
    chunks = build_model(model, parallel or layout_of(ctx), runtime, ctx.device)
    load(checkpoint, chunks, ctx=ctx)
    try:
        return evaluate(chunks, batches, ctx)
    finally:
        del chunks
