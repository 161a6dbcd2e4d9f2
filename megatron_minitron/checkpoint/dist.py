"""Our checkpoints: megatron dist_checkpointing tensors + a JSON header with the model config.

Layout of one checkpoint folder (written atomically: a `.tmp` folder renamed at the end):
    <root>/step_000010/            dist_checkpointing shards (model, optimizer, RNG)
    <root>/step_000010/minitron.json   model config, tokenizer, step, consumed samples, layout,
                                   and the sha256 of every other file (checked at load)
    <root>/latest                  name of the newest complete step folder
A checkpoint saved at one TP/PP loads at any other that the shapes allow (dist_checkpointing
reshards); RNG and optimizer state are restored only when the layout is unchanged.
"""

import dataclasses
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from megatron_minitron.checkpoint import integrity
from megatron_minitron.checkpoint.write_queue import queue_dies_with_process
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig, RopeScaling
from megatron_minitron.runtime import atomic_files
from megatron_minitron.runtime.rank import is_rank0

HEADER = "minitron.json"
LATEST = "latest"


@dataclasses.dataclass
class CheckpointHeader:
    """What a checkpoint says about itself, readable without megatron-core."""

    model: ModelConfig
    tokenizer: Dict[str, Any] = dataclasses.field(default_factory=dict)
    step: int = 0
    consumed_samples: int = 0
    layout: Dict[str, int] = dataclasses.field(default_factory=dict)
    has_optimizer: bool = False
    extra: Dict[str, Any] = dataclasses.field(default_factory=dict)
    files: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    """Every other file of the folder: {relative path: {"bytes", integrity.DIGEST}}, checked
    before a load; empty in checkpoints saved before hashes were recorded (they load
    unverified)."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CheckpointHeader":
        d = json.loads(text)
        m = d.pop("model")
        if m.get("rope_scaling") is not None:
            m["rope_scaling"] = RopeScaling(**m["rope_scaling"])
        return cls(model=ModelConfig(**m), **d)


CARRIED_EXTRA = ("hf",)
"""Header extras a checkpoint derived from another (pruned, trained, distilled) keeps: "hf",
the Hugging Face family, token ids and dtype it was imported with, so that it exports as it
was imported."""


def carried_extra(header: CheckpointHeader) -> Dict[str, Any]:
    return {k: header.extra[k] for k in CARRIED_EXTRA if k in header.extra}


def step_dir(root: str, step: int) -> Path:
    return Path(root) / f"step_{step:07d}"


def resolve(path: str) -> Optional[Path]:
    """A step folder from either a step folder or a root holding `latest`; None if empty."""
    p = Path(path).expanduser()
    if (p / HEADER).is_file():
        return p
    if (p / LATEST).is_file():
        q = p / (p / LATEST).read_text().strip()
        if (q / HEADER).is_file():
            return q
    return None


def read_header(path: str, field: str = "checkpoint.load") -> CheckpointHeader:
    """`field`: the config field that gave `path`, named in the error when it is wrong."""
    p = resolve(path)
    if p is None:
        raise ConfigError(field, f"no complete checkpoint at {path} (no {HEADER} "
                          f"and no '{LATEST}' pointer)", "point to a step_* folder or its root")
    return parse_header(p, field)


DCP_METADATA = ".metadata"


def content_digest(path: str) -> Optional[str]:
    """A digest of what the checkpoint holds: the same for two saves of the same tensors and
    header fields, so it can key a cache of results computed from the checkpoint. torch DCP's
    .metadata names the save's folder and a random save id; only its tensor layout counts.
    None for a checkpoint that recorded no file hashes (saved before they were)."""
    import hashlib
    import pickle

    header = read_header(path)  # a named error when there is no checkpoint
    if not header.files:
        return None
    step = resolve(path)
    parts = {name: f.get(integrity.DIGEST) for name, f in sorted(header.files.items())}
    if DCP_METADATA in parts:
        meta = pickle.loads((step / DCP_METADATA).read_bytes())  # our own, verified at load
        # written by threads: the same entries in any order
        layout = [sorted(map(repr, d.items())) for d in (
            meta.state_dict_metadata, meta.storage_data, meta.planner_data or {})]
        parts[DCP_METADATA] = hashlib.sha256(repr(layout).encode()).hexdigest()
    head = dataclasses.asdict(header)
    head.pop("files")
    where = head["tokenizer"].pop("path", None)  # a tokenizer folder beside the steps: its files
    if where and Path(where).is_dir():
        parts["tokenizer"] = integrity.hash_files(Path(where), "")
    elif where:
        head["tokenizer"]["path"] = where
    return hashlib.sha256(json.dumps([parts, head], sort_keys=True, default=str)
                          .encode()).hexdigest()


def parse_header(step: Path, field: str = "checkpoint.load") -> CheckpointHeader:
    try:
        return CheckpointHeader.from_json((step / HEADER).read_text())
    except (ValueError, TypeError, KeyError, AttributeError, OSError) as e:
        raise ConfigError(field, f"{step / HEADER} is not a valid checkpoint header "
                          f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})",
                          "point to an intact checkpoint (or its previous step_* folder)") from e


def model_sharded_state_dict(chunks: List[torch.nn.Module]) -> Dict[str, Any]:
    """One flat namespace for all chunks: sharded keys carry global layer numbers, so the same
    file loads whatever the PP/VPP split."""
    from megatron_minitron.models.builder import unwrap

    return {f"chunk{i}": unwrap(c).sharded_state_dict(prefix="")
            for i, c in enumerate(chunks)}


def _rng_sharded_object(layout: Dict[str, int], ranks: Dict[str, int]):
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    state = {"torch": torch.get_rng_state()}
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    state["tracker"] = get_cuda_rng_tracker().get_states()
    return ShardedObject("rng_state", state, (layout["pp"], layout["tp"], layout["dp"]),
                         (ranks["pp"], ranks["tp"], ranks["dp"]), replica_id=0)


def save(root: str, step: int, chunks: List[torch.nn.Module], header: CheckpointHeader,
         optimizer=None, scheduler=None, keep_last: int = 0, ctx=None) -> Path:
    """Collective: every rank calls it. Returns the final step folder."""
    from megatron.core import dist_checkpointing

    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    rank0 = is_rank0()
    if rank0:
        for stale in Path(root).glob("step_*.tmp"):  # saves killed midway, of any step
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    sd: Dict[str, Any] = {"model": model_sharded_state_dict(chunks)}
    if optimizer is not None:
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"])
        header.has_optimizer = True
    if ctx is not None:
        layout = {"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size}
        ranks = {"tp": ctx.tp_rank, "pp": ctx.pp_rank, "dp": ctx.dp_rank}
        header.layout = layout
        sd["rng"] = _rng_sharded_object(layout, ranks)
    if scheduler is not None:
        header.extra["scheduler"] = scheduler.state_dict()
    queue_dies_with_process()  # megatron's writer starts a Manager server on the first save
    try:
        dist_checkpointing.save(sd, str(tmp))
        _barrier()
        if rank0:
            header.files = integrity.hash_files(tmp, HEADER)
            atomic_files.write_text(tmp / HEADER, header.to_json())
    except BaseException as e:
        if not _disk_full(e):
            raise
        if rank0:
            shutil.rmtree(tmp, ignore_errors=True)
        raise atomic_files.DiskFull(tmp, state_bytes(sd)) from e
    if rank0:
        atomic_files.remove_tree(final)  # a save of the same step again (after a resume)
        os.replace(tmp, final)
        _write_latest(Path(root), final.name)
        if keep_last:
            _prune_old(Path(root), keep_last)
    _barrier()
    return final


def _write_latest(root: Path, name: str) -> None:
    atomic_files.write_text(root / LATEST, name)


def _disk_full(e: BaseException) -> bool:
    """ENOSPC, raised here or inside torch.distributed.checkpoint's per-rank failures."""
    seen = 0
    while e is not None and seen < 8:
        if atomic_files.is_disk_full(e):
            return True
        failures = getattr(e, "failures", None)
        if isinstance(failures, dict) and any(
                isinstance(f, tuple) and f and _disk_full(f[0]) for f in failures.values()):
            return True
        e, seen = e.__cause__ or e.__context__, seen + 1
    return False


def state_bytes(sd: Any) -> int:
    """Bytes of the tensors this rank saves (what a checkpoint needs on disk, about)."""
    if isinstance(sd, dict):
        return sum(state_bytes(v) for v in sd.values())
    if isinstance(sd, (list, tuple)):
        return sum(state_bytes(v) for v in sd)
    data = getattr(sd, "data", sd)
    return data.numel() * data.element_size() if isinstance(data, torch.Tensor) else 0


def _prune_old(root: Path, keep_last: int) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir() and ".tmp" not in p.name)
    for p in steps[:-keep_last]:
        atomic_files.remove_tree(p)


def load(path: str, chunks: List[torch.nn.Module], optimizer=None, scheduler=None, ctx=None,
         strict: bool = True, field: str = "checkpoint.load", verify: bool = True
         ) -> CheckpointHeader:
    """Load weights (and, when given and the layout matches, optimizer/scheduler/RNG) in place.
    Raises ConfigError naming `field` (the setting that chose this checkpoint) when the
    checkpoint is missing, damaged (its files fail their hashes, unless verify is False) or
    unreadable, or when its architecture disagrees with the built model."""
    p = resolve(path)
    if p is None:
        raise ConfigError(field, f"no complete checkpoint at {path}",
                          "point to a step_* folder or a folder with a 'latest' file")
    check(p, field, verify)
    try:
        return _load(p, chunks, optimizer, scheduler, ctx, strict)
    except ConfigError:
        raise
    except (KeyboardInterrupt, SystemExit):
        raise
    except BaseException as e:  # torch's checkpoint errors need not derive from Exception
        raise unreadable(field, p, e) from e


def unreadable(field: str, p: Path, e: BaseException) -> ConfigError:
    failures = getattr(e, "failures", None)  # torch's CheckpointException: {rank: (exc, tb)}
    if isinstance(failures, dict) and failures:
        cause = next(iter(failures.values()))
        e = cause[0] if isinstance(cause, tuple) and cause else e
    text = str(e).strip().splitlines()
    return ConfigError(field, f"checkpoint {p} could not be read ({type(e).__name__}"
                       f"{': ' + text[0][:200] if text else ''})",
                       "point it to an intact checkpoint (a damaged or partly copied one "
                       "cannot be loaded)")


def _load(p: Path, chunks, optimizer, scheduler, ctx, strict) -> CheckpointHeader:
    from megatron.core import dist_checkpointing

    from megatron_minitron.models.builder import unwrap

    header = parse_header(p)
    sd: Dict[str, Any] = {"model": model_sharded_state_dict(chunks)}
    _check_shapes(sd["model"], p, header)
    same_layout = ctx is not None and header.layout == {
        "tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size}
    if optimizer is not None and header.has_optimizer:
        sd["optimizer"] = optimizer.sharded_state_dict(sd["model"], is_loading=True)
    if same_layout:
        sd["rng"] = _rng_sharded_object(header.layout, {
            "tp": ctx.tp_rank, "pp": ctx.pp_rank, "dp": ctx.dp_rank})
    state = dist_checkpointing.load(sd, str(p))
    for i, c in enumerate(chunks):
        unwrap(c).load_state_dict(state["model"][f"chunk{i}"], strict=strict)
    if "optimizer" in sd:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and "scheduler" in header.extra:
        scheduler.load_state_dict(header.extra["scheduler"])
    if "rng" in state:
        from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

        torch.set_rng_state(state["rng"]["torch"])
        get_cuda_rng_tracker().set_states(state["rng"]["tracker"])
    return header


def damage(p: Path) -> Optional[str]:
    """Why the step folder p cannot be trusted, or None. Rank 0 reads, every rank learns the
    answer (collective when torch.distributed is up): the ranks must agree on what to load."""
    def local() -> Optional[str]:
        header = p / HEADER
        if integrity.already_checked(p, header):
            return None
        try:
            files = json.loads(header.read_text()).get("files") or {}
        except (OSError, ValueError) as e:
            return f"its {HEADER} cannot be read ({type(e).__name__}: {e})"
        if not files:
            _say_once(f"checkpoint {p} records no file hashes (saved before they were); "
                      "loading it unverified")
            return None
        try:
            problem = integrity.damage(p, files, HEADER)
        except OSError as e:
            problem = f"a file cannot be read ({e})"
        if problem is None:
            integrity.mark_checked(p, header)
        return problem

    return _agree(local)


def verified(path: str, field: str, verify: bool = True) -> Path:
    """The step folder that `path` (set by the user as `field`) names, checked before any work:
    a missing or damaged checkpoint is a ConfigError naming that field."""
    p = resolve(path)
    if p is None:
        raise ConfigError(field, f"no complete checkpoint at {path} (no {HEADER} and no "
                          f"'{LATEST}' pointer)", "point to a step_* folder or its root")
    check(p, field, verify)
    return p


def check(p: Path, field: str, verify: bool = True) -> None:
    """Raise ConfigError naming `field` when p's files do not match the hashes it recorded.
    verify=False settles p unchecked for this process, so later loads of it skip the check."""
    if not verify:
        integrity.mark_checked(p, p / HEADER)
        return
    problem = damage(p)
    if problem is not None:
        raise ConfigError(field, f"checkpoint {p} is damaged or incomplete: {problem}",
                          "point it to an intact checkpoint (restore this one from a copy), "
                          "or set checkpoint.verify=false to load it anyway")


def resolve_intact(root: str, field: str, verify: bool = True) -> Optional[Path]:
    """The newest step folder under root that verifies (None if root has none), saying once
    which newer ones were skipped as damaged. Raises when every one is damaged."""
    newest = resolve(root)
    steps = sorted((q for q in Path(root).expanduser().glob("step_*")
                    if q.is_dir() and ".tmp" not in q.name and (q / HEADER).is_file()),
                   reverse=True)
    candidates = ([newest] if newest else []) + [q for q in steps if q != newest]
    if not candidates or not verify:
        return candidates[0] if candidates else None
    skipped: List[Tuple[Path, str]] = []
    for q in candidates:
        problem = damage(q)
        if problem is None:
            for bad, why in skipped:
                _say_once(f"checkpoint {bad} is damaged ({why}); resuming from {q} instead")
            return q
        skipped.append((q, problem))
    bad, why = skipped[0]
    raise ConfigError(field, f"every checkpoint under {root} is damaged (newest: {bad}: {why})",
                      f"restore them from a copy, or remove {root} to start over "
                      "(checkpoint.verify=false loads them anyway)")


def _agree(fn: Callable[[], Optional[str]]) -> Optional[str]:
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return fn()
    box: List[Optional[str]] = [None]
    if dist.get_rank() == 0:
        try:
            box[0] = fn()
        except Exception as e:  # the other ranks wait on this broadcast: never skip it
            box[0] = f"{type(e).__name__}: {e}"
    dist.broadcast_object_list(box, src=0)
    return box[0]


_said: set = set()


def _say_once(message: str) -> None:
    if message not in _said and is_rank0():
        _said.add(message)
        print(f"minitron: warning: {message}", file=sys.stderr, flush=True)


def _check_shapes(model_sd: Dict[str, Any], path: Path, header: CheckpointHeader) -> None:
    """Name the first tensor whose global shape differs, before dist_checkpointing's deep error."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedTensor
    from megatron.core.dist_checkpointing.dict_utils import nested_values

    saved = dist_checkpointing.load_tensors_metadata(str(path))
    for v in nested_values(model_sd):
        if not isinstance(v, ShardedTensor):
            continue
        if v.key not in saved:
            raise ConfigError("checkpoint.load", f"{path} has no tensor {v.key}",
                              "load a checkpoint of the same architecture (its minitron.json: "
                              f"{header.model})")
        if tuple(saved[v.key].global_shape) != tuple(v.global_shape):
            raise ConfigError(
                "model", f"checkpoint tensor {v.key} has shape {tuple(saved[v.key].global_shape)} but "
                f"the configured model expects {tuple(v.global_shape)}",
                "drop the model overrides; a checkpoint carries its own model config")


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()
