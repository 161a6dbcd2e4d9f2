"""`minitron train`: pretraining and teacher correction (LM loss, optionally from a checkpoint)."""

from pathlib import Path

from megatron_minitron.config.loader import to_yaml
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.runtime.distributed import initialize, teardown
from megatron_minitron.training.data_source import build_source, resolve_tokenizer
from megatron_minitron.training.lm_step import LMStep
from megatron_minitron.training.loop import LoopState
from megatron_minitron.training.session import adopt_model_config, build_trainer, find_start


def write_resolved_config(cfg: MinitronConfig, rank: int) -> None:
    if rank == 0:
        Path(cfg.run.dir).mkdir(parents=True, exist_ok=True)
        (Path(cfg.run.dir) / "config.yaml").write_text(to_yaml(cfg))


def train_lm(cfg: MinitronConfig, model_overridden: bool = False) -> LoopState:
    ctx = initialize(cfg.parallel, cfg.runtime)
    try:
        start = find_start(cfg)
        cfg = adopt_model_config(cfg, start, model_overridden)
        write_resolved_config(cfg, ctx.rank)
        tok = resolve_tokenizer(cfg, start.header)
        data = build_source(cfg, ctx, tok)
        trainer, state = build_trainer(
            cfg, ctx, start, lambda chunks: LMStep(ctx.device), data,
            tok.describe(), config_dict=None)
        state = trainer.run(state)
        trainer.writer.close()
        return state
    finally:
        teardown()
