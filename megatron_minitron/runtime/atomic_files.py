"""Files that survive a crash at any instant.

A whole file (a config, a marker, scores, a report) is written to a temp sibling named
`NAME.tmp-PID`, fsynced and renamed over NAME, so a reader sees the old file or the new one,
never a part. A log (metrics.jsonl) is appended one line at a time and read back tolerating a
torn last line, which a crash can leave. Temp siblings of dead processes are swept when a run
folder's lock is taken (runtime/run_lock.py). A full disk is DiskFull (exit 2) naming run.dir
and the bytes the write needed."""

import contextlib
import errno
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any, Iterator, List, Union

from megatron_minitron.config.errors import ConfigError

TMP_TAG = ".tmp-"
"""Temp siblings are NAME + TMP_TAG + the writer's pid."""


class DiskFull(ConfigError):
    """A write ran out of space; what was there before is intact."""

    def __init__(self, path: Path, needed: int):
        free = shutil.disk_usage(_existing(path)).free
        super().__init__("run.dir", f"no space left on the device writing {path} (it needs "
                         f"about {needed:,} bytes, {free:,} are free)",
                         "free space there or point run.dir (or the path's setting) at a "
                         "larger disk, then rerun the same command: it resumes")


def _existing(path: Path) -> Path:
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def is_disk_full(e: BaseException) -> bool:
    return isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)


def temp_sibling(path: Path) -> Path:
    return path.with_name(f"{path.name}{TMP_TAG}{os.getpid()}")


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def replacing(path: Union[str, Path], needed: int = 0) -> Iterator[Path]:
    """Yields a temp path to write (with any API); on success it replaces `path` atomically.
    On failure the temp is removed and `path` is as it was."""
    path = Path(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if is_disk_full(e):
            raise DiskFull(path, needed) from e
        raise


def write_bytes(path: Union[str, Path], data: bytes) -> None:
    with replacing(path, needed=len(data)) as tmp:
        tmp.write_bytes(data)


def write_text(path: Union[str, Path], text: str) -> None:
    write_bytes(path, text.encode())


def write_json(path: Union[str, Path], obj: Any, **dumps) -> None:
    write_text(path, json.dumps(obj, **dumps) + "\n")


def append_line(path: Union[str, Path], line: str) -> None:
    """One record of an append-only log; a crash can tear only the last line."""
    data = (line + "\n").encode()
    try:
        with open(path, "ab") as f:
            f.write(data)
    except OSError as e:
        if is_disk_full(e):
            raise DiskFull(Path(path), len(data)) from e
        raise


def read_json_lines(path: Union[str, Path], field: str = "run.dir") -> List[dict]:
    """The records of a JSON-lines log. A torn last line (no newline, or not JSON) is dropped
    with one warning naming the file; a bad line before it is a ConfigError naming `field`."""
    path = Path(path)
    text = path.read_text(errors="replace")
    lines = text.split("\n")
    filled = [i for i, line in enumerate(lines) if line.strip()]
    final = filled[-1] if filled else -1
    records: List[dict] = []
    for i in filled:
        line, last = lines[i], i == final
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if last:
                print(f"minitron: {path}: dropped a torn last line ({len(line)} bytes), "
                      "left by a crash", file=sys.stderr)
                break
            raise ConfigError(field, f"{path} line {i + 1} is not JSON (damaged in the "
                              "middle, not by a crash)", f"restore {path.name} or remove it")
    return records


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def sweep_temp(folder: Union[str, Path]) -> List[Path]:
    """Remove the temp siblings of dead writers under `folder`; returns what was removed."""
    removed = []
    for p in Path(folder).rglob(f"*{TMP_TAG}*"):
        pid = p.name.rpartition(TMP_TAG)[2]
        if not pid.isdigit() or _pid_alive(int(pid)):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()
        removed.append(p)
    return removed


def remove_tree(path: Union[str, Path]) -> None:
    """Delete a folder so that a crash midway leaves no half-deleted folder under its name:
    it is renamed to a temp sibling first (swept later if the crash comes before the end)."""
    path = Path(path)
    if not path.exists():
        return
    tmp = temp_sibling(path)
    os.replace(path, tmp)
    shutil.rmtree(tmp, ignore_errors=True)
