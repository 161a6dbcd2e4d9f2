"""The top operators of a step by self CPU time (torch.profiler), as shares of all operator time:
the before/after tables of docs/PERFORMANCE.md. Shares, not milliseconds, compare across runs
on a shared machine whose speed drifts."""

from typing import Callable

import torch
from torch.profiler import ProfilerActivity, profile


def top_ops(step: Callable[[], None], steps: int = 3, rows: int = 12,
            shapes: bool = False) -> str:
    """Run `step` `steps` times under the profiler (after one unprofiled run) and return a
    table: operator, share of all operators' self CPU time, calls per step; shapes=True: one
    row per operator and input shapes, the shapes on the line below."""
    step()
    activities = [ProfilerActivity.CPU] + (
        [ProfilerActivity.CUDA] if torch.cuda.is_available() else [])
    with profile(activities=activities, record_shapes=shapes) as prof:
        for _ in range(steps):
            step()
    events = [e for e in prof.key_averages(group_by_input_shape=shapes)
              if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events)
    events.sort(key=lambda e: -e.self_cpu_time_total)
    lines = [f"  {'operator':<60} {'share':>7} {'calls/step':>10}",
             f"  {'(all operators)':<60} {'100.0%':>7} "
             f"{sum(e.count for e in events) / steps:10.0f}"]
    for e in events[:rows]:
        lines.append(f"  {e.key[:60]:<60} {e.self_cpu_time_total / total:7.1%} "
                     f"{e.count / steps:10.0f}")
        if shapes:
            lines.append(f"    {str(e.input_shapes)[:110]}")
    lines.append(f"  self CPU time of all operators: {total / 1e6 / steps:.3f} s per step")
    return "\n".join(lines)
