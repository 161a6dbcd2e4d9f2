"""Content hashes of a checkpoint's files: written into its header at save, checked at load.

A flipped byte in a shard would otherwise load silently and a truncated one fail deep inside
torch. Each file is cut into 64 MiB blocks hashed in a thread pool (hashlib releases the GIL
on large buffers), so a checkpoint of a few huge shards still uses every core; a file's digest
is the sha256 of its blocks' sha256 digests. Blocks are streamed with pread: memory stays a few
MiB per thread. A folder is checked at most once per process."""

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

DIGEST = "sha256_64MiB_blocks"
"""The header key of a file's digest: sha256 over the concatenated sha256 of its 64 MiB blocks
(the whole file's sha256 cannot be computed in parallel)."""
BLOCK = 64 << 20
CHUNK = 4 << 20


def _hash_block(path: Path, offset: int, size: int) -> bytes:
    h = hashlib.sha256()
    fd = os.open(path, os.O_RDONLY)
    try:
        end = offset + size
        while offset < end:
            data = os.pread(fd, min(CHUNK, end - offset), offset)
            if not data:  # shorter than when listed: the digest will not match
                break
            h.update(data)
            offset += len(data)
    finally:
        os.close(fd)
    return h.digest()


def _files(folder: Path, skip: str) -> List[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != skip)


def hash_files(folder: Path, skip: str, names: Optional[List[str]] = None) -> Dict[str, Dict]:
    """{relative path: {"bytes", DIGEST}} for every file under folder except `skip` (the header
    that will hold this table), or for the given relative `names` only."""
    files = _files(folder, skip) if names is None else [folder / n for n in names]
    sizes = [p.stat().st_size for p in files]
    jobs = [(p, off, min(BLOCK, size - off)) for p, size in zip(files, sizes)
            for off in range(0, max(size, 1), BLOCK)]
    with ThreadPoolExecutor(max(1, min(len(jobs), os.cpu_count() or 1, 32))) as pool:
        digests = list(pool.map(lambda job: _hash_block(*job), jobs))
    per_file: Dict[Path, List[bytes]] = {p: [] for p in files}
    for (p, _, _), d in zip(jobs, digests):
        per_file[p].append(d)
    return {str(p.relative_to(folder)): {"bytes": size, DIGEST: hashlib.sha256(
        b"".join(per_file[p])).hexdigest()} for p, size in zip(files, sizes)}


def damage(folder: Path, recorded: Dict[str, Dict], skip: str) -> Optional[str]:
    """What is wrong with folder's files against the recorded table, or None when they match.
    Sizes are compared first (a truncated or missing shard costs no hashing)."""
    for name, want in recorded.items():
        p = folder / name
        if not p.is_file():
            return f"file {name} is missing"
        if p.stat().st_size != want["bytes"]:
            return f"file {name} has {p.stat().st_size} bytes, {want['bytes']} were saved"
    actual = hash_files(folder, skip, sorted(recorded))
    for name, want in recorded.items():
        if actual[name][DIGEST] != want.get(DIGEST):
            return f"file {name} does not match its recorded sha256 (its content changed)"
    return None


_checked: Dict[str, int] = {}
"""Folders already verified in this process -> their header's mtime_ns (re-check if rewritten)."""


def already_checked(folder: Path, header: Path) -> bool:
    return _checked.get(str(folder.resolve())) == header.stat().st_mtime_ns


def mark_checked(folder: Path, header: Path) -> None:
    _checked[str(folder.resolve())] = header.stat().st_mtime_ns
