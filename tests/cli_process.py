"""Run `minitron STAGE ...` as a child process the way users do, and read its metrics."""

import json
import os
import subprocess
import sys
from pathlib import Path


def child_env():
    """os.environ without torchrun-style variables: a single-process group made earlier in this
    pytest process leaves them (MASTER_PORT...) behind, and a child must not inherit them."""
    dist_vars = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    return {k: v for k, v in os.environ.items() if k not in dist_vars}


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
