"""One function per pipeline stage. Each takes the run's MinitronConfig plus its inputs and the
folder it owns, does its work with every rank taking part, and returns its outputs as a
JSON-serialisable dict (paths and numbers) that the pipeline records in `stage.json`.
The standalone CLIs (`minitron importance`, `minitron prune`) call the same functions."""

import dataclasses
import json
import os
import subprocess
import sys
from functools import partial
from pathlib import Path
from typing import Dict, List, Optional

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.checkpoint import embedded
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.parallel import ParallelConfig
from megatron_minitron.config.schema import MinitronConfig, RunConfig
from megatron_minitron.config.train import TrainConfig
from megatron_minitron.runtime.rank import is_rank0
from megatron_minitron.runtime import atomic_files


class StageIncomplete(Exception):
    """A training stage stopped before its last step (train.exit_after_iters); rerun resumes."""


def _world() -> "tuple[int, int]":
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _single_process(convert, args: List[str]) -> None:
    """HF conversion runs in one process: in place for a world of one, else rank 0 runs it as a
    fresh single-process `minitron convert` while the other ranks wait."""
    from megatron_minitron.runtime.distributed import barrier, teardown

    rank, world = _world()
    if world == 1:
        try:
            convert()
        finally:
            teardown()  # the converter's model-parallel state; the process group stays
        return
    if rank == 0:
        env = {k: v for k, v in os.environ.items()
               if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT",
                            "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")}
        subprocess.run([sys.executable, "-m", "megatron_minitron.cli.main", "convert", *args],
                       env=env, check=True)
    barrier()


def import_teacher(cfg: MinitronConfig, out: Path) -> Dict:
    """The teacher as one of our checkpoints: converted from HF, or used where it is."""
    from megatron_minitron.checkpoint.hf import hf_to_mcore

    from megatron_minitron.runtime.console import foreign_output

    src = cfg.pipeline.teacher
    if src == "init":
        return init_teacher(cfg, out)
    quiet = lambda: foreign_output(out / "stage.log", cfg.logger.verbose)  # noqa: E731
    if embedded.is_embedded(src):
        with quiet():
            src = str(embedded.fetch(src)) if is_rank0() else src
    elif not (Path(src).expanduser() / "config.json").is_file():
        if ckpt.resolve(src) is None:
            raise ConfigError("pipeline.teacher", f"{src} is neither a Hugging Face folder "
                              "(config.json) nor one of our checkpoints",
                              f"use one of {embedded.NAMES}, an HF model folder or a "
                              "checkpoint folder")
        return {"checkpoint": str(ckpt.resolve(src))}
    dst = out / "checkpoint"
    with quiet():
        _single_process(lambda: hf_to_mcore(src, str(dst)),
                        ["convert.direction=hf_to_mcore", f"convert.input={src}",
                         f"convert.output={dst}"])
    return {"checkpoint": str(ckpt.resolve(str(dst)))}


def init_teacher(cfg: MinitronConfig, out: Path) -> Dict:
    """A freshly initialised `model` (tests and from-scratch runs; pair it with correction)."""
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import process_groups
    from megatron_minitron.training.data_source import resolve_tokenizer

    with process_groups(cfg.parallel, cfg.runtime) as ctx:
        chunks = build_model(cfg.model, cfg.parallel, cfg.runtime, ctx.device)
        header = ckpt.CheckpointHeader(model=cfg.model,
                                       tokenizer=resolve_tokenizer(cfg, None).describe())
        path = ckpt.save(str(out / "checkpoint"), 0, chunks, header, ctx=ctx)
    return {"checkpoint": str(path)}


def stage_train_config(train: TrainConfig, iters: int, lr: Optional[float] = None
                       ) -> TrainConfig:
    """The shared train section with this stage's length (warmup kept below it)."""
    opt = train.optimizer
    lr = lr or opt.lr
    opt = dataclasses.replace(opt, lr=lr, min_lr=min(opt.min_lr, lr),
                              lr_warmup_iters=min(opt.lr_warmup_iters, max(iters - 1, 0)))
    return dataclasses.replace(train, train_iters=iters, optimizer=opt)


def _train(cfg: MinitronConfig, init: str, out: Path, iters: int, run, lr=None,
           time_budget_s: Optional[float] = None) -> Dict:
    """Fine-tune from `init` for `iters` steps (or until time_budget_s is spent, when given) in
    `out`, resuming its own checkpoints."""
    train = stage_train_config(cfg.train, iters, lr)
    if time_budget_s:
        train = dataclasses.replace(train, time_budget_s=time_budget_s)
    stage_cfg = dataclasses.replace(
        cfg, run=RunConfig(dir=str(out)), train=train,
        checkpoint=dataclasses.replace(cfg.checkpoint, save=None, load=init, finetune=True))
    state = run(stage_cfg)
    if state.step < iters and not state.budget_spent:
        raise StageIncomplete(f"{out.name} stopped at step {state.step} of {iters}")
    path = ckpt.resolve(str(out / "checkpoints"))
    return {"checkpoint": str(path), "tokens": state.consumed_samples * cfg.data.seq_length}


def correct_teacher(cfg: MinitronConfig, teacher: str, out: Path) -> Dict:
    from megatron_minitron.training.lm import train_lm

    return _train(cfg, teacher, out, cfg.pipeline.correction_iters, train_lm,
                  cfg.pipeline.correction_lr)


def cache_teacher(cfg: MinitronConfig, teacher: str, out: Path) -> Dict:
    """The teacher's cache for every distillation of the pipeline: as many train and
    validation samples as the longest of them reads (the distill rounds, search candidates)."""
    from megatron_minitron.distill.cache_writer import write_cache

    iters, evals = cfg.pipeline.distill_iters, cfg.train.eval_iters
    if cfg.pipeline.target == "search":
        from megatron_minitron.pipeline.search_runs import distill_iters

        iters, evals = max(iters, distill_iters(cfg)), max(evals, cfg.search.eval_iters)
    stage_cfg = dataclasses.replace(
        cfg, run=RunConfig(dir=str(out)),
        train=dataclasses.replace(stage_train_config(cfg.train, max(iters, 1)),
                                  eval_iters=evals),
        distill=dataclasses.replace(cfg.distill, teacher_checkpoint=teacher),
        cache=dataclasses.replace(cfg.cache, output=str(out / "cache")))
    return {"cache": str(write_cache(stage_cfg))}


def distill_student(cfg: MinitronConfig, teacher: str, student: str, out: Path) -> Dict:
    from megatron_minitron.training.lm import distill

    cfg = dataclasses.replace(cfg, distill=dataclasses.replace(cfg.distill,
                                                               teacher_checkpoint=teacher))
    return _train(cfg, student, out, cfg.pipeline.distill_iters, distill,
                  time_budget_s=cfg.pipeline.distill_time_budget_s)


def score(cfg: MinitronConfig, checkpoint: str, output: str) -> Dict:
    """Importance scores of `checkpoint` (importance.source: activations on calibration samples
    from cfg.data, or a data-free baseline); rank 0 writes `output`."""
    import torch.distributed as dist

    from megatron_minitron.data.datasets import build_datasets
    from megatron_minitron.data.loader import calibration_batches
    from megatron_minitron.importance.runner import score_checkpoint
    from megatron_minitron.runtime.distributed import process_groups
    from megatron_minitron.training.data_source import resolve_tokenizer

    imp = cfg.importance
    ckpt.verified(checkpoint, "checkpoint.load", cfg.checkpoint.verify)
    header = ckpt.read_header(checkpoint)
    cfg = dataclasses.replace(cfg, model=header.model)  # its architecture, checked vs layout
    with process_groups(cfg.parallel, cfg.runtime) as ctx:
        make_batches, data = None, None  # the magnitude and random baselines read no data
        if imp.source == "activation":
            tok = resolve_tokenizer(cfg, header)
            calib = build_datasets(cfg.data, tok, (imp.num_samples, 0, 0), cfg.runtime.seed,
                                   is_rank0=ctx.rank == 0, barrier=dist.barrier)[0]
            data = {"paths": cfg.data.paths, "split": cfg.data.split, "seed": cfg.runtime.seed,
                    "seq_length": cfg.data.seq_length, "tokenizer": tok.describe()}
            make_batches = partial(calibration_batches, calib, imp.num_samples,
                                   imp.micro_batch_size, ctx.dp_rank, ctx.dp_size)
        score_checkpoint(checkpoint, imp, make_batches, ctx, cfg.parallel, cfg.runtime, output,
                         data, progress=cfg.logger.progress_bar)
    tokens = imp.num_samples * cfg.data.seq_length if imp.source == "activation" else 0
    return {"scores": output, "tokens": tokens}


def prune(cfg: MinitronConfig, checkpoint: str, scores: Optional[str], output: str) -> Dict:
    """Slice `checkpoint` to cfg.prune's target; one full copy per rank (TP=1, PP=1)."""
    from megatron_minitron.pruning.slicing import prune_checkpoint
    from megatron_minitron.runtime.distributed import process_groups

    ckpt.verified(checkpoint, "checkpoint.load", cfg.checkpoint.verify)
    with process_groups(ParallelConfig(), cfg.runtime) as ctx:
        path = prune_checkpoint(checkpoint, scores, cfg.prune, output, ctx, cfg.runtime)
    return {"checkpoint": str(path)}


def export(cfg: MinitronConfig, checkpoint: str, out: Path) -> Dict:
    from megatron_minitron.checkpoint.hf import mcore_to_hf

    out = out / "hf"
    _single_process(lambda: mcore_to_hf(checkpoint, str(out), dtype=cfg.convert.dtype),
                    ["convert.direction=mcore_to_hf", f"convert.input={checkpoint}",
                     f"convert.output={out}", f"convert.dtype={cfg.convert.dtype or 'null'}"])
    return {"hf_dir": str(out)}


def evaluate_models(cfg: MinitronConfig, checkpoints: Dict[str, str], out: Path) -> Dict:
    """Held-out loss and perplexity of each checkpoint on the same validation batches
    (out/models.json); with eval.tasks, also the `minitron eval` suite (perplexity sets and
    lm-eval-harness tasks) on every checkpoint, so that the report sets the teacher beside
    the pruned and distilled students (out/eval_models.json), the last one, the final
    student, also as out/eval.json. Each checkpoint is loaded once, a validation set that the
    suite scores anyway is not scored twice, and with eval.cache a checkpoint scored before
    under the same settings (the teacher, in every rerun) is not scored again."""
    from megatron_minitron.eval import score_cache
    from megatron_minitron.eval.perplexity import (checkpoint_tokenizer, evaluate_checkpoint,
                                                   split_batches)
    from megatron_minitron.eval.suite import (EVAL_MODELS, evaluate_run, perplexity_sets,
                                              write_eval_json)
    from megatron_minitron.runtime.device import say_once
    from megatron_minitron.runtime.distributed import process_groups
    from megatron_minitron.runtime.progress import Progress

    for path in checkpoints.values():
        ckpt.verified(path, "checkpoint.load", cfg.checkpoint.verify)
    results, suites = {}, {}
    with process_groups(cfg.parallel, cfg.runtime) as ctx:
        # one step per model: the time left is an estimate
        bar = Progress(len(checkpoints), 0, cfg.logger.progress_bar and ctx.rank == 0,
                       "eval models")
        try:
            tok = checkpoint_tokenizer(next(iter(checkpoints.values())))
            batches = split_batches(cfg.data, tok, "valid", cfg.pipeline.eval_samples,
                                    cfg.train.micro_batch_size, ctx, cfg.runtime.seed)
            sets = perplexity_sets(cfg, tok, ctx) if cfg.eval.tasks else None
            for name, path in checkpoints.items():
                model_cfg = dataclasses.replace(cfg, model=ckpt.read_header(path).model)
                key = score_cache.cache_key(model_cfg, path, ctx.device) \
                    if cfg.eval.cache else None
                scored = score_cache.read(cfg, key)
                if scored is not None:
                    say_once(f"minitron: eval: the {name} checkpoint was scored before with the "
                             f"same files, settings and code; its scores come from "
                             f"{score_cache.entry_path(cfg, key)} (eval.cache=false scores "
                             "it again)")
                elif cfg.eval.tasks:
                    suite = evaluate_run(model_cfg, path, tok, ctx, sets, also=batches,
                                         log=out / "stage.log")
                    scored = {"models": suite.pop("also"), "suite": suite}
                else:
                    r = evaluate_checkpoint(path, batches, ctx, cfg.runtime, cfg.parallel)
                    scored = {"models": dataclasses.asdict(r)}
                score_cache.write(cfg, key, path, scored)
                r = scored["models"]
                results[name] = {"params": model_cfg.model.num_parameters(),
                                 "loss": r["loss"], "perplexity": r["perplexity"],
                                 "eval_tokens": r["tokens"]}
                if "suite" in scored:
                    suites[name] = dict(scored["suite"], checkpoint=str(
                        ckpt.resolve(path).resolve()))
                bar.update(bar.completed + 1, {name: r["loss"]})
        finally:
            bar.close()
    if ctx.rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        atomic_files.write_json(out / "models.json", results, indent=2)
        if suites:
            write_eval_json(suites[list(checkpoints)[-1]], str(out))
            atomic_files.write_json(out / EVAL_MODELS, {"models": suites}, indent=2)
    return results


def report(cfg: MinitronConfig, summary: Dict, out: Path) -> Dict:
    """report.md + plots in run.dir (rank 0)."""
    from megatron_minitron.eval.report import write_report

    path = write_report(cfg.run.dir) if is_rank0() else Path(cfg.run.dir) / "report.md"
    return {"report": str(path)}


def search(cfg: MinitronConfig, teacher: str, student: str, scores: str, out: Path) -> Dict:
    """`minitron search` from `student`'s scores; returns the best ranking row."""
    from megatron_minitron.pipeline.search_runs import run_search

    cfg = dataclasses.replace(
        cfg, search=dataclasses.replace(cfg.search, checkpoint=student, scores=scores,
                                        output=str(out)),
        distill=dataclasses.replace(cfg.distill, teacher_checkpoint=teacher))
    return run_search(cfg).best
