"""Datasets -> the per-rank micro-batch iterators the loop pulls from."""

from typing import Optional

from megatron_minitron.checkpoint.dist import CheckpointHeader
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.data.datasets import build_datasets, samples_per_split
from megatron_minitron.data.loader import build_iterator
from megatron_minitron.data.tokenizer import Tokenizer, build_tokenizer, tokenizer_from_description
from megatron_minitron.runtime.distributed import ParallelContext


class DatasetSource:
    """Train batches resume at consumed_samples; validation always reads the same first batches."""

    def __init__(self, train_ds, valid_ds, micro_batch_size: int, ctx: ParallelContext,
                 num_workers: int = 0):
        self.train_ds, self.valid_ds = train_ds, valid_ds
        self.mbs, self.ctx, self.num_workers = micro_batch_size, ctx, num_workers

    def train_iterator(self, consumed_samples: int):
        return build_iterator(self.train_ds, self.mbs, self.ctx.dp_rank, self.ctx.dp_size,
                              consumed_samples, num_workers=self.num_workers)

    def valid_iterator(self):
        if self.valid_ds is None:
            raise ConfigError("data.split", "the validation split is empty",
                              "give the second split number a non-zero share, e.g. '949,50,1'")
        return build_iterator(self.valid_ds, self.mbs, self.ctx.dp_rank, self.ctx.dp_size, 0,
                              cyclic=True)


def resolve_tokenizer(cfg: MinitronConfig, header: Optional[CheckpointHeader]) -> Tokenizer:
    """The configured tokenizer, else the one the checkpoint recorded; it must fit the model."""
    if cfg.data.tokenizer.path is None and header is not None and header.tokenizer:
        tok = tokenizer_from_description(header.tokenizer)
    else:
        tok = build_tokenizer(cfg.data.tokenizer)
    if tok.vocab_size > cfg.model.vocab_size:
        raise ConfigError("data.tokenizer.path", f"the tokenizer has {tok.vocab_size} tokens but "
                          f"the model's vocab_size is {cfg.model.vocab_size}",
                          "use the model's own tokenizer or a model with a larger vocab_size")
    return tok


def build_source(cfg: MinitronConfig, ctx: ParallelContext, tok: Tokenizer) -> DatasetSource:
    import torch.distributed as dist

    counts = samples_per_split(cfg.train)
    if cfg.distill.teacher_cache:  # the datasets the cache was written from
        from megatron_minitron.distill.cache_header import dataset_samples, read_header

        counts = dataset_samples(read_header(cfg.distill.teacher_cache)["samples"])
    train, valid, _ = build_datasets(cfg.data, tok, counts, cfg.runtime.seed,
                                     is_rank0=ctx.rank == 0,
                                     barrier=dist.barrier if dist.is_initialized() else None)
    if cfg.distill.teacher_cache:  # the batches say which samples they hold
        from megatron_minitron.data.sample_keys import SPLIT_IDS, KeyedSamples

        train = KeyedSamples(train, SPLIT_IDS["train"])
        valid = None if valid is None else KeyedSamples(valid, SPLIT_IDS["valid"])
    return DatasetSource(train, valid, cfg.train.micro_batch_size, ctx, cfg.data.num_workers)
