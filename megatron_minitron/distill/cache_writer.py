"""`minitron cache-teacher`: one forward pass of the teacher over the distillation samples,
writing the cache distill/teacher_cache.py describes.

Any TP x PP x DP layout: the samples still to write (all of them, or on a resume those in no
intact shard) are shared out like megatron's sampler (of each micro_batch_size x DP group,
DP rank r takes the r-th block; the last group is padded with repeats that are not written),
run through megatron's forward-only schedule, and on the last pipeline stage the logits' TP
shards are gathered so the records are computed on the full vocabulary, by TP rank 0 of each
DP rank, which writes a shard every cache.shard_samples samples. Rank 0 writes the index last,
after checking that every planned sample is in an intact shard."""

import sys
from functools import partial
from pathlib import Path
from typing import Dict, List, Set

import numpy as np
import torch
import torch.distributed as dist

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.data.loader import BATCH_KEYS
from megatron_minitron.data.sample_keys import SPLIT_IDS
from megatron_minitron.distill import cache_records as rec
from megatron_minitron.distill.cache_header import (build_header, dataset_samples, same_build,
                                                    samples_needed)
from megatron_minitron.distill.teacher_cache import (HEADER, INDEX, disk_use, intact_shards,
                                                     write_shard)
from megatron_minitron.runtime.collectives import all_gather_last_dim
from megatron_minitron.runtime import atomic_files


def _records(cfg: MinitronConfig, logits: torch.Tensor, vocab: int, split: int,
             sample: int) -> Dict[str, np.ndarray]:
    """logits: one sample's full-vocabulary logits `[s, v_padded]`."""
    c = cfg.cache
    dtype = np.dtype(c.logprob_dtype)
    logp = torch.log_softmax(logits[:, :vocab].float() / c.temperature, dim=-1)
    out = {}
    if c.mode in ("topk", "both"):
        out.update(rec.topk_record(logp, min(c.k, vocab), dtype))
    if c.mode in ("sampled", "both"):
        g = rec.sample_generator(cfg.runtime.seed, split, sample)
        out.update(rec.sampled_record(logp, c.k, g, dtype))
    return out


class _Block:
    """Forward step and loss function of one block of micro-batches; keeps the records."""

    def __init__(self, cfg, ctx, vocab, split, batches):
        self.cfg, self.ctx, self.vocab, self.split = cfg, ctx, vocab, split
        self.batches, self.rows = batches, []

    def forward_step(self, data_iterator, model):
        batch = next(data_iterator)
        out = model(batch["tokens"].to(self.ctx.device),
                    batch["position_ids"].to(self.ctx.device), None)
        return out, partial(self._keep, batch)

    def _keep(self, batch, logits):
        # [b, s, v/tp] -> [b, s, v_padded], every TP rank takes part in the gather
        full = all_gather_last_dim(logits.float().contiguous(), self.ctx.tp_group).cpu()
        if self.ctx.tp_rank == 0:
            for row, (sample, real) in enumerate(zip(batch["samples"], batch["real"])):
                if real:
                    r = _records(self.cfg, full[row], self.vocab, self.split, sample)
                    r["samples"] = np.int64(sample)
                    r["token_hash"] = rec.token_hash(batch["tokens"][row])
                    self.rows.append(r)
        return torch.zeros((), device=logits.device), {}


def _batches(dataset, todo: List[int], mbs: int, dp_rank: int, dp_size: int) -> List[Dict]:
    """This DP rank's micro-batches of the samples `todo` (megatron's sampler order)."""
    group = mbs * dp_size
    padded = todo + [todo[-1]] * (-len(todo) % group)
    real = [True] * len(todo) + [False] * (len(padded) - len(todo))
    out = []
    for start in range(dp_rank * mbs, len(padded), group):
        idx = padded[start:start + mbs]
        items = [dataset[i] for i in idx]
        batch = {k: torch.stack([torch.as_tensor(it[k]) for it in items]) for k in BATCH_KEYS}
        batch.update(samples=idx, real=real[start:start + mbs])
        out.append(batch)
    return out


def _write_split(cfg, ctx, chunks, dataset, split: str, todo: List[int], vocab: int,
                 folder: Path) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    if not todo:
        return
    mbs = cfg.train.micro_batch_size
    batches = _batches(dataset, todo, mbs, ctx.dp_rank, ctx.dp_size)
    per_block = max(1, cfg.cache.shard_samples // mbs)
    writer = ctx.is_last_stage and ctx.tp_rank == 0
    for start in range(0, len(batches), per_block):
        block = _Block(cfg, ctx, vocab, SPLIT_IDS[split], batches[start:start + per_block])
        with torch.no_grad():
            get_forward_backward_func()(
                forward_step_func=block.forward_step, data_iterator=iter(block.batches),
                model=chunks[0], num_microbatches=len(block.batches),
                seq_length=cfg.data.seq_length, micro_batch_size=mbs, forward_only=True)
        if writer and block.rows:
            write_shard(folder, split, {k: np.stack([r[k] for r in block.rows])
                                        for k in block.rows[0]})
        if ctx.rank == 0:
            done = min(len(batches), start + per_block) * mbs * ctx.dp_size
            print(f"cache-teacher: {split} {min(done, len(todo))}/{len(todo)} samples",
                  file=sys.stderr, flush=True)


def _prepare(folder: Path, header: dict) -> Dict[str, Set[int]]:
    """Rank 0: start the folder, or check that it holds the same build; the samples done."""
    import json

    folder.mkdir(parents=True, exist_ok=True)
    if (folder / HEADER).is_file():
        old = json.loads((folder / HEADER).read_text())
        key = same_build(old, header)
        if key is not None:
            raise ConfigError("cache.output", f"{folder} holds a cache built with another "
                              f"{key} ({old.get(key)!r}, now {header[key]!r})",
                              "write to another cache.output, or delete that folder")
    else:
        atomic_files.write_text(folder / HEADER, json.dumps(header, indent=2, sort_keys=True))
    done: Dict[str, Set[int]] = {s: set() for s in SPLIT_IDS}
    for name, samples in intact_shards(folder).items():
        done[name.split("-", 1)[0]].update(samples)
    return done


def _finish(folder: Path, header: dict) -> None:
    import json

    shards = intact_shards(folder)
    for split, n in header["samples"].items():
        have = {i for name, s in shards.items() if name.startswith(split + "-") for i in s}
        if not set(range(n)) <= have:
            raise RuntimeError(f"teacher cache {folder}: {n - len(have)} {split} samples were "
                               "not written; run cache-teacher again to complete it")
    atomic_files.write_text(folder / INDEX, json.dumps({"complete": True, "shards": shards}))


def write_cache(cfg: MinitronConfig) -> Path:
    """Write (or complete) the cache of cfg.distill.teacher_checkpoint; its folder."""
    from megatron_minitron.data.datasets import build_datasets
    from megatron_minitron.data.tokenizer import build_tokenizer, tokenizer_from_description
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import process_groups
    from megatron_minitron.runtime.run_lock import hold_run_dir

    teacher = cfg.distill.teacher_checkpoint
    folder = Path(cfg.cache_output).expanduser()
    with process_groups(cfg.parallel, cfg.runtime) as ctx, \
            hold_run_dir(str(folder), ctx.rank, "cache.output"):
        ckpt.verified(teacher, "distill.teacher_checkpoint", cfg.checkpoint.verify)
        t = ckpt.read_header(teacher, "distill.teacher_checkpoint")
        tok = (tokenizer_from_description(t.tokenizer) if cfg.data.tokenizer.path is None
               and t.tokenizer else build_tokenizer(cfg.data.tokenizer))
        barrier = dist.barrier if dist.is_initialized() else None
        datasets = build_datasets(cfg.data, tok, dataset_samples(samples_needed(cfg)),
                                  cfg.runtime.seed, is_rank0=ctx.rank == 0, barrier=barrier)
        header = build_header(cfg, teacher, tok, t.model.vocab_size)  # the data exists now
        box = [_prepare(folder, header) if ctx.rank == 0 else None]
        if dist.is_initialized():
            dist.broadcast_object_list(box, src=0)
        done = box[0]
        chunks = build_model(t.model, cfg.parallel, cfg.runtime, ctx.device)
        ckpt.load(teacher, chunks, ctx=ctx, field="distill.teacher_checkpoint",
                  verify=cfg.checkpoint.verify)
        for c in chunks:
            c.eval()
        for split, dataset in zip(SPLIT_IDS, datasets):
            todo = [i for i in range(header["samples"][split]) if i not in done[split]]
            _write_split(cfg, ctx, chunks, dataset, split, todo, t.model.vocab_size, folder)
        if dist.is_initialized():
            dist.barrier()
        if ctx.rank == 0:
            _finish(folder, header)
            print(f"cache-teacher: {folder}: {disk_use(folder)}", flush=True)
        return folder
