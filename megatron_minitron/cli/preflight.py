"""What each stage checks before any work: the paths the user set (each error names the field
that held the path), the sequence length against the model, eval tasks, and where it writes.
`check(stage, cfg)` raises ConfigError; it reads headers and small files only."""

from pathlib import Path
from typing import Callable, Dict, Optional, Tuple

from megatron_minitron.checkpoint import embedded
from megatron_minitron.checkpoint.readable import check_readable
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.paths import existing_file, new_file, utf8_files, writable_dir
from megatron_minitron.config.schema import MinitronConfig


def source(*candidates: Tuple[Optional[str], str]) -> Tuple[Optional[str], str]:
    """The first path set among (path, field) pairs, with the field that set it."""
    for path, field in candidates:
        if path:
            return path, field
    return None, candidates[0][1]


def checkpoint(cfg: MinitronConfig, own: Optional[str], own_field: str,
               required: bool = True) -> Optional[ModelConfig]:
    """Check the stage's source checkpoint (own field, else checkpoint.load); its model."""
    path, field = source((own, own_field), (cfg.checkpoint.load, "checkpoint.load"))
    if path is None:
        if required:
            raise ConfigError(own_field, "no checkpoint given",
                              f"set {own_field}=CKPT (or checkpoint.load)")
        return None
    return check_readable(path, field).model


def positions(cfg: MinitronConfig, model: Optional[ModelConfig]) -> None:
    if model is not None and cfg.data.seq_length > model.max_position_embeddings:
        raise ConfigError("data.seq_length", f"{cfg.data.seq_length} tokens exceed the model's "
                          f"max_position_embeddings {model.max_position_embeddings}",
                          f"use data.seq_length <= {model.max_position_embeddings}")


def scores(cfg: MinitronConfig, *candidates: Tuple[Optional[str], str]) -> None:
    """The scores file the stage will read: the first field set, else RUN_DIR's if present."""
    from megatron_minitron.importance.scores import load_scores

    path, field = source(*candidates)
    default = Path(cfg.run_scores)
    if path or default.is_file():
        load_scores(path or str(default), field)


def eval_inputs(cfg: MinitronConfig) -> None:
    utf8_files(cfg.eval.text_files, "eval.text_files")
    if cfg.eval.tasks:
        from megatron_minitron.eval.lm_eval_adapter import check_tasks

        check_tasks(cfg.eval.tasks, cfg.eval.task_paths)


def train(cfg: MinitronConfig) -> None:
    model = checkpoint(cfg, None, "checkpoint.load", required=False)
    positions(cfg, model or cfg.model)
    if cfg.checkpoint.save:
        writable_dir(cfg.checkpoint.save, "checkpoint.save")
    writable_dir(cfg.run.dir, "run.dir")


def distill(cfg: MinitronConfig) -> None:
    teacher = cfg.distill.teacher_checkpoint
    if cfg.distill.teacher_cache:
        from megatron_minitron.training.cached_distill import open_cache

        open_cache(cfg)
        if teacher:
            check_readable(teacher, "distill.teacher_checkpoint")
        train(cfg)
        return
    if not teacher:
        raise ConfigError("distill.teacher_checkpoint", "no teacher given",
                          "set distill.teacher_checkpoint=CKPT (one of our checkpoints)")
    positions(cfg, check_readable(teacher, "distill.teacher_checkpoint").model)
    train(cfg)


def cache_teacher(cfg: MinitronConfig) -> None:
    teacher = cfg.distill.teacher_checkpoint
    if not teacher:
        raise ConfigError("distill.teacher_checkpoint", "no teacher given",
                          "set distill.teacher_checkpoint=CKPT (the teacher to cache)")
    positions(cfg, check_readable(teacher, "distill.teacher_checkpoint").model)
    writable_dir(cfg.cache_output, "cache.output" if cfg.cache.output else "run.dir")


def importance(cfg: MinitronConfig) -> None:
    positions(cfg, checkpoint(cfg, cfg.importance.checkpoint, "importance.checkpoint"))
    if cfg.importance.output:
        new_file(cfg.importance.output, "importance.output")
    else:
        writable_dir(cfg.run.dir, "run.dir")


def prune(cfg: MinitronConfig) -> None:
    src, p = checkpoint(cfg, cfg.prune.checkpoint, "prune.checkpoint"), cfg.prune
    if p.param_budget is not None:
        n = src.num_parameters(include_embeddings=p.budget_include_embeddings)
        if p.param_budget >= n:
            raise ConfigError("prune.param_budget", f"{p.param_budget:,} is not below the "
                              f"source's {n:,} parameters, so nothing would be pruned",
                              f"use a budget below {n:,}")
    scores(cfg, (p.scores, "prune.scores"))
    writable_dir(cfg.prune.output or cfg.run.dir, "prune.output" if cfg.prune.output else "run.dir")


def search(cfg: MinitronConfig) -> None:
    path, field = source((cfg.search.checkpoint, "search.checkpoint"),
                         (cfg.prune.checkpoint, "prune.checkpoint"),
                         (cfg.checkpoint.load, "checkpoint.load"))
    if path is not None:
        positions(cfg, check_readable(path, field).model)
    scores(cfg, (cfg.search.scores, "search.scores"), (cfg.prune.scores, "prune.scores"))
    if cfg.distill.teacher_checkpoint:
        check_readable(cfg.distill.teacher_checkpoint, "distill.teacher_checkpoint")
    writable_dir(cfg.run.dir, "run.dir")


def evaluate(cfg: MinitronConfig) -> None:
    positions(cfg, checkpoint(cfg, cfg.eval.checkpoint, "eval.checkpoint"))
    eval_inputs(cfg)
    writable_dir(cfg.eval.output or cfg.run.dir, "eval.output" if cfg.eval.output else "run.dir")


def pipeline(cfg: MinitronConfig) -> None:
    teacher = cfg.pipeline.teacher
    if teacher == "init":
        positions(cfg, cfg.model)
    elif (Path(teacher).expanduser() / "config.json").is_file():
        from megatron_minitron.checkpoint.hf import check_hf_folder

        positions(cfg, check_hf_folder(teacher))
    elif not embedded.is_embedded(teacher):
        positions(cfg, check_readable(teacher, "pipeline.teacher").model)
    eval_inputs(cfg)
    writable_dir(cfg.run.dir, "run.dir")


def convert(cfg: MinitronConfig) -> None:
    c = cfg.convert
    c.check_paths()
    if c.direction == "mcore_to_hf":
        check_readable(c.input, "convert.input")
    elif not embedded.is_embedded(c.input):
        from megatron_minitron.checkpoint.hf import check_hf_folder

        existing_file(str(Path(c.input) / "config.json"), "convert.input",
                      "Hugging Face model folder's config.json")
        check_hf_folder(c.input)
    writable_dir(c.output, "convert.output")


def data(cfg: MinitronConfig) -> None:
    pre = cfg.preprocess
    if pre.output_prefix and not pre.input:
        raise ConfigError("preprocess.input", "preprocess.output_prefix is set but no input "
                          "is given", "pass preprocess.input=[FILE_OR_FOLDER,...] (or drop "
                          "output_prefix to prepare the demo corpus)")
    if pre.input:
        from megatron_minitron.data.preprocess import input_files

        input_files(pre.input)
        output = cfg.data_output_prefix
        new_file(output + ".bin", "preprocess.output_prefix" if pre.output_prefix else "run.dir")


CHECKS: Dict[str, Callable[[MinitronConfig], None]] = {
    "train": train, "distill": distill, "cache-teacher": cache_teacher,
    "importance": importance, "prune": prune,
    "search": search, "eval": evaluate, "pipeline": pipeline, "convert": convert, "data": data}


def check(stage: str, cfg: MinitronConfig) -> MinitronConfig:
    CHECKS[stage](cfg)
    return cfg
