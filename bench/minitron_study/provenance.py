"""Where a number came from: the command, the commit and the machine, stored beside each arm."""

import os
import platform
import shlex
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Dict

_REPO = Path(__file__).resolve().parents[2]


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=_REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


@lru_cache(maxsize=1)
def provenance() -> Dict[str, str]:
    import torch

    commit = _git("rev-parse", "HEAD") or "unknown"
    # uncommitted edits change what ran; say so rather than pretend the commit is exact
    if _git("status", "--porcelain", "--untracked-files=no"):
        commit += " (with uncommitted changes)"
    return {"command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
            "commit": commit,
            "machine": f"{platform.platform()}, {os.cpu_count()} CPUs, torch {torch.__version__}"}
