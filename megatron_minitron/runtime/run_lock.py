"""One writer per run folder: rank 0 holds an advisory fcntl lock on RUN_DIR/.lock for the
stage, so a second job on the same run.dir stops at once instead of interleaving metrics and
rotating the same checkpoints; taking it sweeps the temp files of writers killed midway
(runtime/atomic_files.py). The kernel drops the lock when its process dies (even by
kill -9), so a stale file never blocks. Re-entrant within a process: the pipeline holds its
run folder while its stages take the lock again."""

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch.distributed as dist

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.runtime import atomic_files

LOCK_FILE = ".lock"

_held: Dict[str, Tuple[int, int]] = {}
"""Resolved run folder -> (file descriptor, depth) for the locks this process holds."""


def _acquire(run_dir: Path) -> Optional[str]:
    """Take or re-enter the lock; the reason it is unavailable otherwise."""
    key = str(run_dir.resolve())
    if key in _held:
        fd, depth = _held[key]
        _held[key] = (fd, depth + 1)
        return None
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        what = "is not a folder" if run_dir.exists() and not run_dir.is_dir() else "is unusable"
        return f"{run_dir} {what}: cannot create {run_dir / LOCK_FILE} ({e.strerror})"
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        return (f"{run_dir} is in use by another job (process {holder}, holding "
                f"{run_dir / LOCK_FILE})")
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    _held[key] = (fd, 1)
    atomic_files.sweep_temp(run_dir)  # what writers killed mid-write left; we are the writer now
    return None


def _release(run_dir: Path) -> None:
    key = str(run_dir.resolve())
    fd, depth = _held[key]
    if depth > 1:
        _held[key] = (fd, depth - 1)
        return
    del _held[key]
    os.ftruncate(fd, 0)  # a finished job leaves the file as it found it (kill -9 leaves its pid)
    fcntl.flock(fd, fcntl.LOCK_UN)
    os.close(fd)


def _agreed(problem: Optional[str]) -> Optional[str]:
    """Rank 0's verdict on every rank (collective when torch.distributed is up)."""
    if not (dist.is_initialized() and dist.get_world_size() > 1):
        return problem
    box: List[Optional[str]] = [problem]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@contextlib.contextmanager
def hold_run_dir(run_dir: str, rank: int, field: str = "run.dir"):
    """Rank 0 locks run_dir for the block; every rank raises ConfigError(field) if another
    process holds it. Collective when torch.distributed is initialised."""
    path = Path(run_dir).expanduser()
    problem = _acquire(path) if rank == 0 else None
    problem = _agreed(problem)
    if problem is not None:
        raise ConfigError(field, problem, f"give this job a {field} that is a writable folder "
                          "no other job holds (or wait for that job, or stop it)")
    try:
        yield
    finally:
        if rank == 0:
            _release(path)
