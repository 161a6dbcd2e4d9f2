"""Content-addressed cache of the eval stage's scores of one checkpoint.

`minitron pipeline` scores the teacher, the pruned and the distilled student on the same sets
and tasks in every run. The teacher (and, for the same teacher, scores and target, the pruned
student) is the same checkpoint run after run, so its scores are too: a rerun of the demo with
another distillation recipe need not score the teacher again. The key is everything the scores
depend on:

  * the checkpoint's content (checkpoint.dist.content_digest: the file hashes its header
    recorded at save, and the header; a checkpoint saved before hashes were recorded is never
    cached);
  * the eval settings (eval.*, the run's data, seed, layout) and pipeline.eval_samples with
    the micro-batch size that models.json uses;
  * the resolved device, precision and implementations, torch / megatron-core / lm-eval
    versions, and a digest of the source of the code that scores (eval/, models/, data/).

An entry is `<data.cache_dir>/eval_scores/<key>.json`; a damaged or foreign entry is ignored
and rewritten. `eval.cache=false` always recomputes (and writes nothing). Rank 0 reads and
writes; the entry is broadcast, so every rank takes the same path.
"""

import dataclasses
import functools
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, Optional

import torch

from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.runtime import atomic_files

FORMAT = 1
"""Bump when what an entry holds changes."""
SCORING_PACKAGES = ("eval", "models", "data")


@functools.lru_cache(maxsize=1)
def code_digest() -> str:
    """sha256 over the source of the packages whose code decides a score."""
    root = Path(__file__).resolve().parent.parent
    h = hashlib.sha256()
    for pkg in SCORING_PACKAGES:
        for path in sorted((root / pkg).rglob("*")):
            if path.is_file() and path.suffix in (".py", ".yaml"):
                h.update(str(path.relative_to(root)).encode())
                h.update(path.read_bytes())
    return h.hexdigest()


def _versions() -> Dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"torch": torch.__version__}
    for dist_name in ("megatron-core", "lm_eval", "megatron_minitron"):
        try:
            out[dist_name] = version(dist_name)
        except PackageNotFoundError:
            out[dist_name] = "absent"
    return out


def cache_key(cfg: MinitronConfig, checkpoint: str, device: torch.device) -> Optional[str]:
    """The key of this checkpoint's scores under cfg, or None when it cannot be cached."""
    from megatron_minitron.checkpoint.dist import content_digest
    from megatron_minitron.runtime.device import (resolve_attention_impl, resolve_precision,
                                                  resolve_transformer_impl)

    content = content_digest(checkpoint)
    if content is None:
        return None
    ev = dataclasses.asdict(cfg.eval)
    for where in ("checkpoint", "output"):  # where, not what: they do not change a score
        ev.pop(where)
    data = dataclasses.asdict(cfg.data)
    data.pop("num_workers")
    spec = {
        "format": FORMAT,
        "checkpoint": content,
        "eval": ev, "data": data, "seed": cfg.runtime.seed,
        "models_json": [cfg.pipeline.eval_samples, cfg.train.micro_batch_size],
        "parallel": dataclasses.asdict(cfg.parallel),
        "device": device.type, "precision": resolve_precision(cfg.runtime, device.type),
        "transformer_impl": resolve_transformer_impl(cfg.runtime),
        "attention_impl": resolve_attention_impl(cfg.runtime),
        "versions": _versions(), "code": code_digest()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def entry_path(cfg: MinitronConfig, key: str) -> Path:
    return Path(cfg.data.cache_dir).expanduser() / "eval_scores" / f"{key}.json"


def _share(obj: Any) -> Any:
    """Rank 0's obj on every rank (no-op in a single process)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def read(cfg: MinitronConfig, key: Optional[str]) -> Optional[Dict[str, Any]]:
    """The cached scores for key (every rank gets rank 0's answer), else None."""
    from megatron_minitron.runtime.rank import is_rank0

    found = None
    if key is not None and is_rank0():
        try:
            entry = json.loads(entry_path(cfg, key).read_text())
            if entry.get("key") == key and "scores" in entry:
                found = entry["scores"]
        except (OSError, ValueError):
            found = None
    return _share(found)


def write(cfg: MinitronConfig, key: Optional[str], checkpoint: str,
          scores: Dict[str, Any]) -> None:
    """Store scores under key (rank 0; atomic rename, so a reader never sees half a file)."""
    from megatron_minitron.runtime.rank import is_rank0

    if key is None or not is_rank0():
        return
    path = entry_path(cfg, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_files.write_json(path, {"key": key, "checkpoint": str(checkpoint), "scores": scores},
                            indent=1)
