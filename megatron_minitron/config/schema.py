"""The root config: one typed section per concern. Stages read the sections they need."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from megatron_minitron.config.cache import CacheConfig
from megatron_minitron.config.convert import ConvertConfig
from megatron_minitron.config.data import DataConfig, PreprocessConfig
from megatron_minitron.config.distill import DistillConfig
from megatron_minitron.config.eval import EvalConfig
from megatron_minitron.config.importance import ImportanceConfig
from megatron_minitron.config.prune import PruneConfig
from megatron_minitron.config.search import SearchConfig
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
from megatron_minitron.config.pipeline import PipelineConfig
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.train import (CheckpointConfig, LoggerConfig, TrainConfig,
                                            time_budget_problem)


@dataclass
class RunConfig:
    """Where a stage writes."""

    dir: str = "runs/default"
    """Run folder: metrics.jsonl, config.yaml, checkpoints and stage outputs go here."""


@dataclass
class MinitronConfig:
    """Everything a stage needs. Convert from Hydra once (config.loader) and pass this around."""

    run: RunConfig = field(default_factory=RunConfig)
    """Output location."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Architecture (replaced by a loaded checkpoint's own config)."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP / VPP layout."""
    runtime: RuntimeConfig = field(default_factory=RuntimeConfig)
    """Device, kernels, precision, seed."""
    data: DataConfig = field(default_factory=DataConfig)
    """Tokenizer and datasets."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Training loop."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpoint save/load."""
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    """Logging."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    """`minitron data`: text/JSONL -> indexed dataset."""
    convert: ConvertConfig = field(default_factory=ConvertConfig)
    """`minitron convert`: Hugging Face <-> megatron checkpoints."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """`minitron distill`: the teacher and the distillation losses."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """`minitron cache-teacher`: the teacher's distributions cached for teacher-free KD."""
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    """`minitron importance`: calibration data and aggregation."""
    prune: PruneConfig = field(default_factory=PruneConfig)
    """`minitron prune`: the target architecture or parameter budget."""
    search: SearchConfig = field(default_factory=SearchConfig)
    """`minitron search`: candidate architectures ranked by a short distillation."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """`minitron eval`: perplexity and lm-eval-harness tasks."""
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    """`minitron pipeline`: the stages chained end to end."""

    def __post_init__(self):
        self.validate_layout()
        problem = time_budget_problem(self.train.optimizer.lr_decay_style,
                                      self.pipeline.distill_time_budget_s)
        if problem:  # said before any stage runs, not when the distill stage builds its config
            raise ConfigError("pipeline.distill_time_budget_s", problem,
                              "set train.optimizer.lr_decay_style=constant or wsd")

    # Defaults that span sections: where each stage reads and writes when its own field is None.

    @property
    def run_scores(self) -> str:
        """The run's scores file: RUN_DIR/importance/scores.safetensors."""
        return str(Path(self.run.dir) / "importance" / "scores.safetensors")

    @property
    def checkpoint_root(self) -> str:
        """Where training saves (and resumes from): checkpoint.save, else RUN_DIR/checkpoints."""
        return self.checkpoint.save or f"{self.run.dir}/checkpoints"

    @property
    def importance_checkpoint(self) -> Optional[str]:
        """The checkpoint to score: importance.checkpoint, else checkpoint.load."""
        return self.importance.checkpoint or self.checkpoint.load

    @property
    def importance_output(self) -> str:
        """The scores file to write: importance.output, else the run's."""
        return self.importance.output or self.run_scores

    @property
    def prune_checkpoint(self) -> Optional[str]:
        """The checkpoint to prune: prune.checkpoint, else checkpoint.load."""
        return self.prune.checkpoint or self.checkpoint.load

    @property
    def prune_scores(self) -> str:
        """The scores to prune by: prune.scores, else the run's."""
        return self.prune.scores or self.run_scores

    @property
    def prune_output(self) -> str:
        """Where the pruned checkpoint goes: prune.output, else RUN_DIR/pruned."""
        return self.prune.output or f"{self.run.dir}/pruned"

    @property
    def cache_output(self) -> str:
        """The teacher cache to write: cache.output, else RUN_DIR/teacher_cache."""
        return self.cache.output or f"{self.run.dir}/teacher_cache"

    @property
    def search_checkpoint(self) -> Optional[str]:
        """The source the search prunes: search.checkpoint, prune.checkpoint, checkpoint.load."""
        return self.search.checkpoint or self.prune_checkpoint

    @property
    def search_scores(self) -> str:
        """The scores the search ranks by: search.scores, prune.scores, else the run's."""
        return self.search.scores or self.prune_scores

    @property
    def search_output(self) -> str:
        """The search's folder: search.output, else RUN_DIR/search."""
        return self.search.output or f"{self.run.dir}/search"

    @property
    def eval_checkpoint(self) -> Optional[str]:
        """The checkpoint to evaluate: eval.checkpoint, else checkpoint.load."""
        return self.eval.checkpoint or self.checkpoint.load

    @property
    def eval_output(self) -> str:
        """Where eval.json goes: eval.output, else RUN_DIR/eval."""
        return self.eval.output or f"{self.run.dir}/eval"

    @property
    def data_output_prefix(self) -> str:
        """`minitron data`'s output: preprocess.output_prefix, else RUN_DIR/data/text_document."""
        return self.preprocess.output_prefix or str(Path(self.run.dir) / "data" / "text_document")

    def validate_layout(self):
        """Cross-section checks: the model's shapes against the parallel layout."""

        m, p = self.model, self.parallel
        tp, pp = p.tensor_model_parallel_size, p.pipeline_model_parallel_size
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            if getattr(m, name) % tp:
                raise ConfigError(f"model.{name}", f"{getattr(m, name)} is not divisible by "
                                  f"tensor_model_parallel_size {tp}",
                                  f"use a multiple of {tp} or a smaller TP")
        if m.padded_vocab_size % tp:
            raise ConfigError("model.make_vocab_size_divisible_by",
                              f"padded vocab {m.padded_vocab_size} is not divisible by TP {tp}",
                              f"use a multiple of {tp}")
        chunks = pp * (p.virtual_pipeline_model_parallel_size or 1)
        if m.num_layers % chunks:
            raise ConfigError("model.num_layers", f"{m.num_layers} layers do not split evenly "
                              f"into {chunks} pipeline chunks",
                              "change num_layers, pipeline or virtual pipeline size")
