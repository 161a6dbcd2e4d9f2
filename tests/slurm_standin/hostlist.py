"""Slurm host list syntax, shared by the srun and scontrol stand-ins."""

import re


def expand_hostlist(hostlist: str):
    """'gpu[01-02,7],login1' -> ['gpu01', 'gpu02', 'gpu7', 'login1']."""
    hosts = []
    for prefix, ranges, plain in re.findall(r"([^,\[]*)\[([^\]]*)\]|([^,]+)", hostlist):
        if plain:
            hosts.append(plain)
            continue
        for part in ranges.split(","):
            lo, _, hi = part.partition("-")
            for n in range(int(lo), int(hi or lo) + 1):
                hosts.append(f"{prefix}{n:0{len(lo)}d}")
    return hosts
