"""Forward-only passes over calibration batches under any TP/PP/DP layout, and the scores.

Every rank ends with the same global scores: statistics are global-shaped with zeros where a
rank owns nothing (aggregation.py), so one sum over the TP, PP and DP groups (`all_reduce_sum`,
the only communication here) assembles them; sample aggregation happens after it.
"""

import dataclasses
from contextlib import ExitStack
from typing import Any, Callable, Dict, Iterable, List, Optional

import torch
import torch.distributed as dist

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.importance import ImportanceConfig
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.importance import aggregation as agg
from megatron_minitron.importance.baselines import magnitude_scores, random_scores
from megatron_minitron.importance.depth import CosineHooks, blocks, skip_layers
from megatron_minitron.importance.experts import (ExpertHooks, check_source, expert_scores,
                                                   new_expert_stats)
from megatron_minitron.importance.hooks import WidthHooks
from megatron_minitron.importance.scores import Scores, ScoresHeader, model_config_hash
from megatron_minitron.models.forward import Batch, MakeBatches, forward_pass
from megatron_minitron.runtime.collectives import all_reduce_sum
from megatron_minitron.runtime.progress import Progress


def calibration_pass(chunks: List[torch.nn.Module], make_batches: MakeBatches, ctx,
                 stats: Optional[agg.Stats] = None,
                 on_batch: Optional[Callable[[Batch], None]] = None) -> torch.Tensor:
    """models.forward.forward_pass over the calibration batches, counting samples into
    stats["samples"] (first-stage TP rank 0)."""
    def count(n: int) -> None:
        stats["samples"] += n

    return forward_pass(chunks, make_batches, ctx, "importance.num_samples", on_batch,
                        None if stats is None else count)


def mean_loss(chunks, make_batches: MakeBatches, ctx, skip: Iterable[int] = ()) -> float:
    """Global mean LM loss over the calibration tokens with the given layers skipped."""
    with skip_layers(chunks, skip):
        total = calibration_pass(chunks, make_batches, ctx)
    all_reduce_sum([total], ctx)
    return float(total[0] / total[1].clamp_min(1.0))


def depth_batches(make_batches: MakeBatches, cfg: ImportanceConfig, dp_size: int
                  ) -> MakeBatches:
    """The first importance.depth_samples of the calibration samples (this rank's share)."""
    if cfg.depth_samples is None:
        return make_batches
    per_rank = -(-cfg.depth_samples // (cfg.micro_batch_size * dp_size))  # ceil
    return lambda: list(make_batches())[:max(1, per_rank)]


def compute_importance(chunks: List[torch.nn.Module], model: ModelConfig, cfg: ImportanceConfig,
                       make_batches: MakeBatches, ctx,
                       data: Optional[Dict[str, Any]] = None, progress: bool = False) -> Scores:
    """All enabled scores of the model in `chunks`, identical on every rank. progress: show
    a bar with the time left over the forward passes (rank 0)."""
    from megatron_minitron.models.builder import unwrap

    if getattr(unwrap(chunks[0]).config, "sequence_parallel", False):
        raise ConfigError("parallel.sequence_parallel", "importance needs each sample's full "
                          "sequence on every TP rank", "set parallel.sequence_parallel=false")
    for c in chunks:
        c.eval()
    stats, mask = agg.new_stats(model, ctx.device), agg.TokenMask()
    stats.update(new_expert_stats(model, ctx.device) if cfg.width else {})
    sizes = sorted(set(k for k in cfg.block_sizes if k <= model.num_layers))
    depth_passes = ((model.num_layers if cfg.depth_loss else 0) +
                    sum(len(blocks(model.num_layers, k)) for k in sizes))
    depth_make = depth_batches(make_batches, cfg, ctx.dp_size)
    separate_base = depth_passes > 0 and depth_make is not make_batches
    bar = Progress(1 + depth_passes + int(separate_base), 0, progress and ctx.rank == 0,
                   "importance passes")
    try:
        with ExitStack() as hooks:
            if cfg.width:
                hooks.enter_context(WidthHooks(chunks, model, stats, cfg.seq_aggregation,
                                               ctx.tp_rank, ctx.tp_size, mask, cfg.head_score))
                hooks.enter_context(ExpertHooks(chunks, stats, cfg.seq_aggregation,
                                                ctx.tp_rank, ctx.tp_size, mask))
            if cfg.depth_cosine:
                hooks.enter_context(CosineHooks(chunks, stats, ctx.tp_rank, mask))
            base = calibration_pass(chunks, make_batches, ctx, stats,
                                on_batch=lambda b: mask.set(b["loss_mask"]))
        all_reduce_sum([base, *stats.values()], ctx)
        base_loss = float(base[0] / base[1].clamp_min(1.0))
        bar.update(1)
        tensors = _depth_scores(chunks, model, cfg, sizes, depth_make, ctx, bar,
                                mean_loss(chunks, depth_make, ctx) if separate_base
                                else base_loss)
    finally:
        bar.close()

    if cfg.width:
        tensors.update(agg.width_scores(stats, model, cfg.sample_aggregation))
        tensors.update(expert_scores(stats, cfg.sample_aggregation))
    if cfg.depth_cosine:
        tensors["layers.cosine"] = agg.cosine_scores(stats)
    header = ScoresHeader(
        model_config_hash=model_config_hash(model), model=dataclasses.asdict(model),
        num_samples=int(stats["samples"]), seq_aggregation=cfg.seq_aggregation,
        sample_aggregation=cfg.sample_aggregation, data=dict(data or {}), base_loss=base_loss,
        block_sizes=sizes, layout={"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size})
    return Scores({k: v.cpu() for k, v in tensors.items()}, header)


def _depth_scores(chunks, model: ModelConfig, cfg: ImportanceConfig, sizes: List[int],
                  make_batches: MakeBatches, ctx, bar: Progress, base_loss: float
                  ) -> Dict[str, torch.Tensor]:
    """LM-loss increase when each layer (depth_loss) or block of k layers is skipped."""
    def increase(skip) -> float:
        value = mean_loss(chunks, make_batches, ctx, skip) - base_loss
        bar.update(bar.completed + 1)
        return value

    if cfg.depth_samples is not None and (cfg.depth_loss or sizes):
        bar.update(bar.completed + 1)  # the separate unskipped pass on the depth samples
    tensors: Dict[str, torch.Tensor] = {}
    if cfg.depth_loss:
        tensors["layers.loss"] = torch.tensor(
            [increase([n]) for n in range(1, model.num_layers + 1)])
    for k in sizes:
        tensors[f"blocks.loss.k{k}"] = torch.tensor(
            [increase(block) for block in blocks(model.num_layers, k)])
    return tensors


def scoring_runtime(cfg: ImportanceConfig, runtime, device_type: str):
    """`runtime` at importance.precision: fp32 unless it is "auto". Scoring in fp32 where
    runtime.precision resolves to bf16 is said once."""
    from megatron_minitron.runtime.device import resolve_precision, say_once

    if cfg.precision == "auto" or resolve_precision(runtime, device_type) == "fp32":
        return runtime
    say_once("minitron: importance scores in fp32 (importance.precision=fp32), not "
             "runtime.precision's bf16, so the pruned architecture does not depend on the "
             "machine; importance.precision=auto scores in bf16")
    return dataclasses.replace(runtime, precision="fp32")


def score_checkpoint(checkpoint: str, cfg: ImportanceConfig, make_batches: Optional[MakeBatches],
                     ctx, parallel, runtime, output: Optional[str] = None,
                     data: Optional[Dict[str, Any]] = None, progress: bool = False) -> Scores:
    """Build the checkpoint's model for this layout, load it, score it by cfg.source; rank 0
    writes `output`. The baselines need no make_batches (random needs no weights either)."""
    from megatron_minitron.checkpoint.dist import load, read_header
    from megatron_minitron.importance.scores import save_scores
    from megatron_minitron.models.builder import build_model

    model = read_header(checkpoint).model
    check_source(model, cfg.source)
    if cfg.source == "random":
        scores = random_scores(model, cfg, runtime.seed, ctx)
    else:
        chunks = build_model(model, parallel, scoring_runtime(cfg, runtime, ctx.device.type),
                             ctx.device)
        load(checkpoint, chunks, ctx=ctx)
        scores = (magnitude_scores(chunks, model, ctx) if cfg.source == "magnitude" else
                  compute_importance(chunks, model, cfg, make_batches, ctx, data, progress))
        del chunks
    if output is not None and ctx.rank == 0:
        save_scores(output, scores)
    if ctx.world_size > 1:
        dist.barrier()
    return scores
