"""Interleaved timing: noisy machines need ratios measured round by round in one process."""

import statistics
import time
from typing import Callable, Dict, List


def interleaved(fns: Dict[str, Callable[[], None]], rounds: int, warmup: int = 1,
                clock: Callable[[], float] = time.perf_counter) -> Dict[str, List[float]]:
    """Seconds per call of each fn, alternating fns within every round. clock=time.process_time
    counts this process's CPU seconds, steadier than wall time on a machine shared with
    other jobs."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    times = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = clock()
            fn()
            times[k].append(clock() - t)
    return times


def ratio_summary(num: List[float], den: List[float]) -> str:
    """Median and range of per-round ratios num/den."""
    r = [a / b for a, b in zip(num, den)]
    return f"median {statistics.median(r):.3f} (range {min(r):.3f}-{max(r):.3f}, {len(r)} rounds)"
