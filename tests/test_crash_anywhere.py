"""Crash anywhere, resume always (bench/crash_anywhere.py, 200 kills there): the smoke pipeline
with a teacher cache, SIGKILLed at 18 seeded random instants spread over all its stages and rerun
after each, ends with the uninterrupted run's weights bit for bit, its losses, its metrics steps
once each and no temp file."""

import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))

KILLS = 18
EXTRA = ["pipeline.teacher_cache=true"]  # cache-teacher and a distill reading the cache


def test_killed_anywhere_the_rerun_finishes_with_the_uninterrupted_result(tmp_path):
    import crash_anywhere as crash

    seconds = crash.reference(tmp_path / "uninterrupted", EXTRA, timeout=600)
    lines = []
    points = crash.crash_run(tmp_path / "crashed", EXTRA, KILLS, seed=0, seconds=seconds,
                             timeout=600, log=lines.append)
    print("\n".join(lines))
    fell_in = {p.fell_in for p in points}
    assert len(points) >= KILLS - 2, lines
    missed = [s for s in seconds if s not in fell_in]
    assert not missed, f"no kill fell in {missed}:\n" + "\n".join(lines)
    problems = crash.compare(tmp_path / "uninterrupted", tmp_path / "crashed")
    assert not problems, "\n".join(problems)
