"""The main job's wall time, measured: `minitron pipeline` (the embedded demo experiment) from
an empty run dir, with the teacher already cached (the one-time download is not counted; it
is fetched first if missing). Prints each stage's seconds (from its stage.json) and the total,
the held-out numbers of the report, the CPU it ran on and the precision `auto` chose there;
the pipeline's console output is kept in RUN_DIR/console.out and console.err.

    python bench/demo_time.py [run_dir=/tmp/minitron_demo_time] [extra="key=value ..."]
"""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_vs_hf import cpu_description  # noqa: E402
from knobs import parse_knobs  # noqa: E402


def main():
    k = parse_knobs(sys.argv[1:], {"run_dir": "/tmp/minitron_demo_time", "extra": ""})
    from megatron_minitron.checkpoint.smollm2 import fetch_smollm2

    fetch_smollm2()  # cached teacher: the download is a one-time cost, not the job's
    run = Path(k["run_dir"])
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "megatron_minitron.cli.main", "pipeline", f"run.dir={run}",
           "logger.progress_bar=false", *k["extra"].split()]
    start = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    total = time.time() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"pipeline exited {proc.returncode}")
    (run / "console.out").write_text(proc.stdout)
    (run / "console.err").write_text(proc.stderr)
    print(f"CPU: {cpu_description()}")
    print(f"precision: {_resolved(run)}")
    stages = sorted(run.glob("**/stage.json"), key=lambda p: p.stat().st_mtime)
    for marker in stages:
        rec = json.loads(marker.read_text())
        print(f"{rec['stage']:>14}: {rec['seconds']:7.1f} s")
    print(f"{'total':>14}: {total:7.1f} s ({total / 60:.1f} min, process start to exit)")
    summary = run / "summary.json"
    if summary.exists():
        print(json.dumps(json.loads(summary.read_text()), indent=1)[:3000])


def _resolved(run: Path) -> str:
    import yaml

    cfg = run / "distill" / "config.yaml"
    if not cfg.is_file():
        return "?"
    r = yaml.safe_load(cfg.read_text())["resolved"]
    return f"{r['precision']} ({r['precision_reason']})"


if __name__ == "__main__":
    main()
