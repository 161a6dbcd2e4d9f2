"""Content hashes of a checkpoint's files: written into its header at save, checked at load.

A flipped byte in a shard would otherwise load silently and a truncated one fail deep inside
torch. Files are hashed in threads (hashlib releases the GIL on large buffers), each streamed,
so a save costs one extra read of what it just wrote, mostly from the page cache. A folder is
checked at most once per process."""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

ALGORITHM = "sha256"
CHUNK = 1 << 22


def _hash_file(path: Path) -> Dict:
    h = hashlib.new(ALGORITHM)
    with open(path, "rb", buffering=0) as f:
        for block in iter(lambda: f.read(CHUNK), b""):
            h.update(block)
    return {"bytes": path.stat().st_size, ALGORITHM: h.hexdigest()}


def _files(folder: Path, skip: str) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != skip)


def hash_files(folder: Path, skip: str) -> Dict[str, Dict]:
    """{relative path: {"bytes", "sha256"}} for every file under folder except `skip` (the
    header that will hold this table)."""
    files = _files(folder, skip)
    workers = max(1, min(len(files), os.cpu_count() or 1, 16))
    with ThreadPoolExecutor(workers) as pool:
        digests = list(pool.map(_hash_file, files))
    return {str(p.relative_to(folder)): d for p, d in zip(files, digests)}


def damage(folder: Path, recorded: Dict[str, Dict], skip: str) -> Optional[str]:
    """What is wrong with folder's files against the recorded table, or None when they match.
    Sizes are compared first (a truncated or missing shard costs no hashing)."""
    for name, want in recorded.items():
        p = folder / name
        if not p.is_file():
            return f"file {name} is missing"
        if p.stat().st_size != want["bytes"]:
            return f"file {name} has {p.stat().st_size} bytes, {want['bytes']} were saved"
    actual = hash_files(folder, skip)
    for name, want in recorded.items():
        if actual[name][ALGORITHM] != want[ALGORITHM]:
            return f"file {name} does not match its {ALGORITHM} (its content changed)"
    return None


_checked: Dict[str, int] = {}
"""Folders already verified in this process -> their header's mtime_ns (re-check if rewritten)."""


def already_checked(folder: Path, header: Path) -> bool:
    return _checked.get(str(folder.resolve())) == header.stat().st_mtime_ns


def mark_checked(folder: Path, header: Path) -> None:
    _checked[str(folder.resolve())] = header.stat().st_mtime_ns
