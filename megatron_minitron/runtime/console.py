"""What reaches the console: our lines (stage headers, our progress bars, the choices said once,
results and errors). The progress bars and notices of the libraries a stage calls (lm-eval's
task notices and tqdm bars, transformers' GGUF and weight-loading bars, datasets' and
huggingface_hub's) are written to the stage's log file instead, where a user can still read
them; `logger.verbose=true` leaves them on the console. Python warnings a user can do nothing
about are filtered by exact message (megatron_minitron/__init__.py)."""

import contextlib
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

FOREIGN_LOGGERS = ("lm_eval", "lm-eval", "transformers", "datasets", "huggingface_hub",
                   "evaluate", "accelerate", "filelock", "fsspec", "urllib3")
"""Loggers of the libraries the eval and convert stages call (lm-eval names its logger both
ways across versions)."""

@contextlib.contextmanager
def _loggers_to(stream) -> Iterator[None]:
    """Each foreign logger writes to `stream` only, for the block (its handlers, level and
    propagation restored after it)."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s: %(message)s"))
    saved = []
    for name in FOREIGN_LOGGERS:
        log = logging.getLogger(name)
        saved.append((log, list(log.handlers), log.propagate, log.level))
        log.handlers = [handler]
        log.propagate = False
        if log.level == logging.NOTSET:
            log.setLevel(logging.INFO)
    try:
        yield
    finally:
        for log, handlers, propagate, level in saved:
            log.handlers, log.propagate = handlers, propagate
            log.setLevel(level)


@contextlib.contextmanager
def foreign_output(log_path: Optional[Path], verbose: bool = False) -> Iterator[None]:
    """Within the block, stderr (where tqdm bars and Python warnings go) and the foreign
    loggers write to `log_path` (appended; made with its folder), not the console. Our own
    lines in the block are unaffected where they go to stdout; say_once writes to the console's
    stderr (runtime/device.py). verbose=True, or no log_path, changes nothing."""
    if verbose or log_path is None:
        yield
        return
    log_path = Path(log_path)
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a", buffering=1) as log, _fd2_to(log) as console:
        with _loggers_to(log), contextlib.redirect_stderr(log), _console_stderr(console):
            yield


@contextlib.contextmanager
def _fd2_to(log) -> Iterator:
    """File descriptor 2 points at `log` for the block, so what child processes (lm-eval runs
    `git describe`) and C code write there goes to the log too; yields a stream on the
    console's stderr. Where sys.stderr is not fd 2 (a caller redirected it), that stream."""
    try:
        on_fd2 = sys.stderr.fileno() == 2
    except (AttributeError, OSError, ValueError):
        on_fd2 = False
    if not on_fd2:
        yield sys.stderr
        return
    sys.stderr.flush()
    saved = os.dup(2)
    console = open(saved, "w", buffering=1, closefd=False)
    os.dup2(log.fileno(), 2)
    try:
        yield console
    finally:
        console.flush()
        log.flush()
        os.dup2(saved, 2)
        console.close()
        os.close(saved)


_console = []


@contextlib.contextmanager
def _console_stderr(stream) -> Iterator[None]:
    _console.append(stream)
    try:
        yield
    finally:
        _console.pop()


def console_stderr():
    """The console's stderr, also inside foreign_output (which points sys.stderr at a log)."""
    return _console[-1] if _console else sys.stderr
