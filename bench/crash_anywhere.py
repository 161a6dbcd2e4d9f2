"""Crash anywhere, resume always: run the smoke pipeline once uninterrupted, then again under a
driver that SIGKILLs it (its whole process group) at N seeded random instants and reruns the same
command after each kill, and check what a user relies on:

- every rerun of the same command goes on, and the last one exits 0;
- the final student's exported weights equal the uninterrupted run's bit for bit, and so do
  the summary's losses (every stage is deterministic on a CPU, resumed or not);
- each stage's metrics.jsonl is valid JSON lines holding the uninterrupted run's steps, none
  lost, none twice;
- no temp file is left in the run folder.

Kill instants are spread over the stages: kill i aims at the stage i * stages / N in pipeline
order (the next unfinished one if that one is done), at a random fraction of that stage's time
in the uninterrupted run, counted from the line the pipeline prints when the stage starts. Each
kill point is printed with the stage it fell in (the last stage line before the kill).

    python bench/crash_anywhere.py [kills=200] [seed=0] [run_dir=/tmp/minitron_crash]
        [extra="pipeline.teacher_cache=true pipeline.target=search"]

tests/test_crash_anywhere.py runs it with about 20 kills.
"""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knobs import parse_knobs  # noqa: E402

STAGE_LINE = "minitron pipeline: stage "
BASE = ["experiment=smoke", "eval.cache=false", "logger.progress_bar=false"]
"""eval.cache=false: the uninterrupted run must not hand its eval scores to the crashed one."""


def command(run_dir: Path, extra: List[str]) -> List[str]:
    return [sys.executable, "-m", "megatron_minitron.cli.main", "pipeline", f"run.dir={run_dir}",
            *BASE, *extra]


def child_env() -> Dict[str, str]:
    dist_vars = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in dist_vars}
    env["MINITRON_TRACEBACK"] = "1"
    return env


@dataclass
class Attempt:
    """One launch of the command: its exit code, the stage lines it printed and when."""
    returncode: Optional[int] = None
    stages: List[str] = field(default_factory=list)
    started: Dict[str, float] = field(default_factory=dict)
    stderr: str = ""


def launch(cmd: List[str]):
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=child_env(), start_new_session=True)
    attempt = Attempt()
    err: List[str] = []

    def read_out():
        for line in p.stdout:
            if line.startswith(STAGE_LINE):
                name = line[len(STAGE_LINE):].strip()
                attempt.stages.append(name)
                attempt.started[name] = time.time()

    threads = [threading.Thread(target=read_out, daemon=True),
               threading.Thread(target=lambda: err.extend(p.stderr), daemon=True)]
    for t in threads:
        t.start()
    return p, attempt, threads, err


def finish(p, attempt: Attempt, threads, err, timeout: float) -> Attempt:
    try:
        p.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for t in threads:
        t.join(timeout=10)
    attempt.returncode, attempt.stderr = p.returncode, "".join(err)
    return attempt


def stage_seconds(run_dir: Path) -> Dict[str, float]:
    """Stage name -> seconds, in pipeline order (the order of the stage markers' writes)."""
    marks = sorted(run_dir.glob("*/stage.json"), key=lambda m: m.stat().st_mtime)
    records = [json.loads(m.read_text()) for m in marks]
    return {r["stage"]: r["seconds"] for r in records}


def reference(run_dir: Path, extra: List[str], timeout: float) -> Dict[str, float]:
    shutil.rmtree(run_dir, ignore_errors=True)
    a = finish(*launch(command(run_dir, extra)), timeout=timeout)
    if a.returncode != 0:
        raise SystemExit(f"the uninterrupted run exited {a.returncode}:\n{a.stderr[-3000:]}")
    return stage_seconds(run_dir)


@dataclass
class KillPoint:
    aimed: str
    fell_in: str
    after_s: float


def crash_run(run_dir: Path, extra: List[str], kills: int, seed: int,
              seconds: Dict[str, float], timeout: float, log=print) -> List[KillPoint]:
    """Kill the command `kills` times, rerunning after each, then let it finish."""
    shutil.rmtree(run_dir, ignore_errors=True)
    rng = random.Random(seed)
    order = list(seconds)
    aims = sorted((min(len(order) - 1, i * len(order) // kills), rng.random())
                  for i in range(kills))
    points: List[KillPoint] = []
    for n, (stage_i, frac) in enumerate(aims, 1):
        done = {m.parent.name for m in run_dir.glob("*/stage.json")}
        pending = [s for s in order[stage_i:] if s not in done] or \
            [s for s in order if s not in done]
        if not pending:
            break
        aim = pending[0]
        p, attempt, threads, err = launch(command(run_dir, extra))
        deadline = time.time() + timeout
        while aim not in attempt.started and p.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        if aim in attempt.started:
            delay = frac * seconds[aim]
            while p.poll() is None and time.time() < attempt.started[aim] + delay:
                time.sleep(0.002)
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        finish(p, attempt, threads, err, timeout)
        if attempt.returncode not in (0, -signal.SIGKILL):
            raise AssertionError(f"a rerun after a kill exited {attempt.returncode} (kill {n}, "
                                 f"aimed at {aim}):\n{attempt.stderr[-3000:]}")
        if attempt.returncode == -signal.SIGKILL:
            fell = attempt.stages[-1] if attempt.stages else "start-up"
            after = time.time() - attempt.started.get(fell, time.time())
            points.append(KillPoint(aim, fell, after))
            log(f"kill {len(points):3d}: in {fell} ({after:.2f} s after it started; "
                f"aimed at {aim})")
    last = finish(*launch(command(run_dir, extra)), timeout=timeout)
    if last.returncode != 0:
        raise AssertionError(f"the final rerun exited {last.returncode}:\n{last.stderr[-3000:]}")
    return points


def exported_tensors(run_dir: Path):
    from safetensors.torch import load_file

    summary = json.loads((run_dir / "summary.json").read_text())
    return load_file(str(Path(summary["export"]) / "model.safetensors")), summary


def metrics_steps(path: Path) -> List[int]:
    """Every line parses (json.loads raises otherwise); the steps of the loss records."""
    text = path.read_text()
    if text and not text.endswith("\n"):
        raise ValueError(f"{path} ends in a torn line")
    steps = []
    for line in text.split("\n")[:-1]:
        rec = json.loads(line)
        if any(k.endswith("loss") for k in rec if not k.startswith("valid_")):
            steps.append(rec["step"])
    return steps


def compare(ref: Path, run: Path) -> List[str]:
    """What differs between the uninterrupted and the crashed run (empty: nothing)."""
    import torch

    problems = []
    a, sa = exported_tensors(ref)
    b, sb = exported_tensors(run)
    if a.keys() != b.keys():
        problems.append(f"exported tensors differ in names: {sorted(a.keys() ^ b.keys())}")
    problems += [f"exported tensor {k} differs" for k in a if k in b and not
                 torch.equal(a[k], b[k])]
    la = {r["name"]: (r["loss"], r["tokens"]) for r in sa["rows"]}
    lb = {r["name"]: (r["loss"], r["tokens"]) for r in sb["rows"]}
    if la != lb:
        problems.append(f"summary losses differ: {la} vs {lb}")
    for m in sorted(ref.glob("*/metrics.jsonl")):
        other = run / m.relative_to(ref)
        if not other.is_file():
            problems.append(f"{other} is missing")
            continue
        want, got = metrics_steps(m), metrics_steps(other)
        if got != want:
            problems.append(f"{other}: steps {got}, uninterrupted {want}")
    temps = [str(p) for p in run.rglob("*") if ".tmp" in p.name]
    if temps:
        problems.append(f"temp files left: {temps[:5]}")
    return problems


def main():
    k = parse_knobs(sys.argv[1:], {"kills": 200, "seed": 0, "run_dir": "/tmp/minitron_crash",
                                   "extra": "", "timeout": 900})
    root, extra = Path(k["run_dir"]), k["extra"].split()
    start = time.time()
    seconds = reference(root / "uninterrupted", extra, k["timeout"])
    print("uninterrupted: " + ", ".join(f"{s} {t:.1f} s" for s, t in seconds.items()))
    points = crash_run(root / "crashed", extra, k["kills"], k["seed"], seconds, k["timeout"])
    problems = compare(root / "uninterrupted", root / "crashed")
    per_stage: Dict[str, int] = {}
    for p in points:
        per_stage[p.fell_in] = per_stage.get(p.fell_in, 0) + 1
    print("kill points per stage: " + ", ".join(f"{s} {n}" for s, n in per_stage.items()))
    for p in problems:
        print(f"PROBLEM: {p}")
    same = "final weights identical" if not problems else "DIFFERENCES above"
    print(f"{len(points)} of {len(points)} kill points resumed, {same} "
          f"({time.time() - start:.0f} s)")
    raise SystemExit(1 if problems else 0)


if __name__ == "__main__":
    main()
