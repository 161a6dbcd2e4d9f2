"""How far a bf16 run lands from the fp32 one: the smoke pipeline (`experiment=smoke`) under
runtime.precision=auto with the CPU flags of each kind (MINITRON_CPU_FLAGS), for several seeds,
and the held-out loss of the teacher, the pruned and the distilled student in each. Three arms:

  fp32            MINITRON_CPU_FLAGS=none: auto picks fp32, as on a CPU without bf16;
  bf16 native     MINITRON_CPU_FLAGS=avx512_bf16: auto picks bf16;
  bf16 emulated   the same, with oneDNN held to AVX-512 without bf16 instructions
                  (ONEDNN_MAX_CPU_ISA=AVX512_CORE_VNNI): the matmul path of a CPU that emulates
                  bf16 (an Ice Lake Xeon), on this machine. Only meaningful where the machine has
                  native bf16: elsewhere both bf16 arms are emulated.

Prints each arm's losses and the largest relative difference from fp32 per seed; that figure
sets tests/test_precision.py's PIPELINE_REL.

    python bench/precision_drift.py [seeds=3] [run_dir=/tmp/minitron_precision_drift]
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_vs_hf import cpu_description  # noqa: E402
from knobs import parse_knobs  # noqa: E402

ARMS = {"fp32": {"MINITRON_CPU_FLAGS": "none"},
        "bf16 native": {"MINITRON_CPU_FLAGS": "avx512_bf16"},
        "bf16 emulated": {"MINITRON_CPU_FLAGS": "avx512_bf16",
                          "ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}}


def losses(run: Path, env: dict, seed: int) -> dict:
    shutil.rmtree(run, ignore_errors=True)
    cmd = [sys.executable, "-m", "megatron_minitron.cli.main", "pipeline", "experiment=smoke",
           f"run.dir={run}", f"runtime.seed={seed}"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"pipeline exited {proc.returncode}")
    rows = json.loads((run / "summary.json").read_text())["rows"]
    return {r["name"]: r["loss"] for r in rows}


def main():
    k = parse_knobs(sys.argv[1:], {"seeds": 3, "run_dir": "/tmp/minitron_precision_drift"})
    print(f"CPU: {cpu_description()}")
    worst = {arm: [] for arm in ARMS if arm != "fp32"}
    for seed in range(int(k["seeds"])):
        got = {arm: losses(Path(k["run_dir"]) / arm.replace(" ", "_"), env, seed)
               for arm, env in ARMS.items()}
        for arm, row in got.items():
            cells = "  ".join(f"{n} {v:.4f}" for n, v in row.items())
            line = f"seed {seed}  {arm:>13}: {cells}"
            if arm != "fp32":
                rel = max(abs(v - got["fp32"][n]) / abs(got["fp32"][n]) for n, v in row.items())
                worst[arm].append(rel)
                line += f"  max rel diff vs fp32 {rel:.2%}"
            print(line, flush=True)
    for arm, rels in worst.items():
        print(f"{arm}: max rel diff vs fp32 over {len(rels)} seeds: {max(rels):.2%} "
              f"(per seed {', '.join(f'{r:.2%}' for r in rels)})")


if __name__ == "__main__":
    main()
