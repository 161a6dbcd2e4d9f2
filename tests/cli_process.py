"""Run `minitron STAGE ...` as a child process the way users do, and read its metrics."""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from pathlib import Path


def child_env():
    """os.environ without torchrun-style variables: a single-process group made earlier in this
    pytest process leaves them (MASTER_PORT...) behind, and a child must not inherit them."""
    dist_vars = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    return {k: v for k, v in os.environ.items() if k not in dist_vars}


def dead_pid() -> str:
    """The pid of a process that has exited (a writer killed long ago, for temp-file names)."""
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()


def minitron(*args, **kw):
    env = {**child_env(), "MINITRON_TRACEBACK": "0"}
    return subprocess.Popen([sys.executable, "-m", "megatron_minitron.cli.main", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            **kw)


def losses(run_dir):
    out = {}
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written while we read
            continue
        if "lm_loss" in rec:
            out[rec["step"]] = rec["lm_loss"]
    return out


class Runaway(BaseException):
    """A case that got past its check and started the stage's real work."""


def _runaway(signum, frame):
    raise Runaway("the stage was still running after its time limit: no check stopped it")


def minitron_in_process(*argv, limit_s: int = 0):
    """(exit code, stdout, stderr) of `minitron *argv`, run in this process; a run longer than
    limit_s seconds is aborted with Runaway."""
    from megatron_minitron.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    old = signal.signal(signal.SIGALRM, _runaway)
    signal.alarm(limit_s)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main([str(a) for a in argv])
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return rc, out.getvalue(), err.getvalue()
