"""Everything `minitron eval` measures on one checkpoint, and the eval.json it writes.

eval.json (rank 0 writes it to eval.output, default run.dir/eval/eval.json):
    {
      "checkpoint": "/abs/path/step_0000100",     the resolved step folder
      "step": 100,                                its training step
      "params": 1234567,                          all parameters (embeddings included)
      "params_non_embedding": 234567,
      "seq_length": 256,                          tokens per perplexity sample
      "perplexity": {                             one entry per evaluated set:
        "valid":   {"loss": 2.31, "perplexity": 10.07, "tokens": 16384},
        "test":    {...},                         eval.splits of the run's data
        "heldout": {...},                         The Tempest (demo corpus only)
        "<file name>": {...}                      each of eval.text_files
      },
      "tasks": {"<task>": {"<metric>,<filter>": value, "sample_len": n, ...}}   if eval.tasks
    }
"""

import dataclasses
import importlib.util
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.runtime.console import foreign_output
from megatron_minitron.runtime import atomic_files

EVAL_FILE = "eval.json"
EVAL_MODELS = "eval_models.json"
"""`minitron pipeline`'s eval stage: {"models": {name: eval.json's dict}} for the teacher, the
pruned and the distilled student, in that order, scored on the same sets and tasks."""


def perplexity_sets(cfg: MinitronConfig, tok, ctx) -> Dict[str, List[Any]]:
    """Name -> this DP rank's batches, for every set the config asks for."""
    from megatron_minitron.data.corpus import demo_heldout_text
    from megatron_minitron.eval.perplexity import heldout_batches, split_batches

    ev, s = cfg.eval, cfg.data.seq_length
    sets: Dict[str, List[Any]] = {}
    for split in ev.splits:
        sets[split] = split_batches(cfg.data, tok, split, ev.num_samples, ev.micro_batch_size,
                                    ctx, cfg.runtime.seed)
    texts = {}
    if ev.heldout_chars and not cfg.data.paths:
        texts["heldout"] = demo_heldout_text(ev.heldout_chars, cfg.data.cache_dir)
    texts.update({Path(f).name: Path(f).expanduser().read_text() for f in ev.text_files})
    for name, text in texts.items():
        sets[name] = heldout_batches(tok, text, s, ev.micro_batch_size, None, ctx.dp_rank,
                                     ctx.dp_size, field="eval.text_files")
    return sets


def evaluate_run(cfg: MinitronConfig, checkpoint: str, tok, ctx,
                 sets: Optional[Dict[str, List[Any]]] = None,
                 also: Optional[List[Any]] = None, log: Optional[Path] = None
                 ) -> Dict[str, Any]:
    """Load the checkpoint once for this layout; perplexity on every set (`sets`: the ones
    perplexity_sets gives, made once by a caller scoring several checkpoints), then lm-eval
    tasks. `also`: more batches scored on the loaded model, their EvalResult under the key
    "also" (not part of eval.json). lm-eval's notices and progress bars go to `log`
    (default run.dir/stage.log) unless logger.verbose. Collective; every rank returns the same
    dict."""
    from megatron_minitron.checkpoint.dist import load, resolve
    from megatron_minitron.eval.perplexity import evaluate
    from megatron_minitron.models.builder import build_model

    if cfg.eval.tasks and importlib.util.find_spec("lm_eval") is None:
        raise ConfigError("eval.tasks", "lm-eval-harness is not installed",
                          "pip install -e '.[eval]', or set eval.tasks=[]")
    model = cfg.model
    chunks = build_model(model, cfg.parallel, cfg.runtime, ctx.device)
    header = load(checkpoint, chunks, ctx=ctx)
    out: Dict[str, Any] = {
        "checkpoint": str(resolve(checkpoint).resolve()), "step": header.step,
        "params": model.num_parameters(include_embeddings=True),
        "params_non_embedding": model.num_parameters(include_embeddings=False),
        "seq_length": cfg.data.seq_length, "perplexity": {}}
    sets = perplexity_sets(cfg, tok, ctx) if sets is None else sets
    for name, batches in sets.items():
        out["perplexity"][name] = dataclasses.asdict(evaluate(chunks, batches, ctx))
    if also is not None:
        same = _shared_set(sets, also, ctx)
        out["also"] = (dict(out["perplexity"][same]) if same is not None
                       else dataclasses.asdict(evaluate(chunks, also, ctx)))
    if cfg.eval.tasks:
        from megatron_minitron.eval.lm_eval_adapter import MinitronLM, run_tasks

        ev = cfg.eval
        lm = MinitronLM(chunks, tok, ctx, model.vocab_size, cfg.data.seq_length,
                        ev.micro_batch_size, ev.max_gen_toks)
        with foreign_output(log or Path(cfg.run.dir) / "stage.log", cfg.logger.verbose):
            out["tasks"] = run_tasks(lm, ev.tasks, ev.task_paths, ev.limit, ev.num_fewshot,
                                     cfg.runtime.seed)
    return out


def _shared_set(sets: Dict[str, List[Any]], batches: List[Any], ctx) -> Optional[str]:
    """The set scoring the same samples as batches on every rank, else None (one answer for
    all ranks: a rank that scored alone would hang the others)."""
    import torch

    from megatron_minitron.runtime.collectives import all_reduce_sum

    for name, b in sets.items():
        differs = torch.tensor([0.0 if same_samples(b, batches) else 1.0])
        all_reduce_sum([differs], ctx)
        if differs.item() == 0:
            return name
    return None


def same_samples(a: List[Any], b: List[Any]) -> bool:
    """Whether two batch lists score the same tokens (micro-batching aside): a sum over the
    same samples, so one pass gives both losses."""
    import torch

    def flat(batches, key):
        return torch.cat([x[key].reshape(-1) for x in batches]) if batches else None

    for key in ("tokens", "labels", "loss_mask"):
        x, y = flat(a, key), flat(b, key)
        if x is None or y is None or x.shape != y.shape or not torch.equal(x, y):
            return False
    return True


def write_eval_json(result: Dict[str, Any], folder: str) -> Path:
    path = Path(folder) / EVAL_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_files.write_json(path, result, indent=2, sort_keys=True)
    return path


def read_eval_json(folder: str) -> Dict[str, Any]:
    return json.loads((Path(folder) / EVAL_FILE).read_text())
