"""`minitron importance [key=value ...]`: score a checkpoint's heads, groups, neurons, channels
and layers on calibration data; rank 0 writes the scores file."""

from dataclasses import replace
from typing import List

import torch.distributed as dist
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.loader import load_config, override_list


def main(overrides: List[str]) -> None:
    overrides = override_list(overrides)
    cfg = load_config(overrides)
    imp = cfg.importance
    from megatron_minitron.checkpoint.dist import read_header
    from megatron_minitron.data.datasets import build_datasets
    from megatron_minitron.data.loader import calibration_batches
    from megatron_minitron.importance.runner import score_checkpoint
    from megatron_minitron.runtime.distributed import initialize, teardown
    from megatron_minitron.training.data_source import resolve_tokenizer

    checkpoint = imp.checkpoint or cfg.checkpoint.load
    if checkpoint is None:
        raise ConfigError("importance.checkpoint", "no checkpoint to score",
                          "set importance.checkpoint or checkpoint.load")
    header = read_header(checkpoint)
    cfg = replace(cfg, model=header.model)  # the checkpoint's architecture, checked vs layout
    output = imp.output or f"{cfg.run.dir}/importance/scores.safetensors"
    ctx = initialize(cfg.parallel, cfg.runtime)
    try:
        tok = resolve_tokenizer(cfg, header)
        calib = build_datasets(cfg.data, tok, (imp.num_samples, 0, 0), cfg.runtime.seed,
                               is_rank0=ctx.rank == 0, barrier=dist.barrier)[0]
        data = {"paths": cfg.data.paths, "split": cfg.data.split, "seed": cfg.runtime.seed,
                "seq_length": cfg.data.seq_length, "tokenizer": tok.describe()}
        score_checkpoint(checkpoint, imp, lambda: calibration_batches(
            calib, imp.num_samples, imp.micro_batch_size, ctx.dp_rank, ctx.dp_size),
            ctx, cfg.parallel, cfg.runtime, output, data)
        if ctx.rank == 0:
            print(f"minitron importance: wrote {output}")
    finally:
        teardown()
