"""Coordinate-wise sweep of the distillation recipe of `ours` (bench/recipe_vs_naive.py) at a
short budget, scored on the *select* half of every held-out text (the reported table uses the
other half). Starting from `start` (the manual try of issue 15: 4 x 256 per step, constant lr
3e-4, no warmup, forward KL at T=1), each stage tries its values of one group of knobs with the
others fixed at the best so far, every point on every seed; the point with the lowest mean
select loss (averaged over texts, then seeds) is kept for the next stage.

    python bench/recipe_sweep.py [tokens=20480] [seeds=1,2,3] [stages=lr,schedule]
                                 [work=/tmp/minitron_bench_smollm2] [windows=10]
                                 [threads=2] [shard=0/1]

shard=i/n: this process runs every n-th run of each stage (from the i-th) and waits for the
other shards' results (cached JSON) before choosing; on 2 cores, two shards with threads=1
each finish a stage sooner than one process with threads=2.

Prints one row per point (mean perplexity and min-max over seeds per text, and the mean loss
the choice is made on) and last the chosen recipe as recipe_vs_naive knobs. Runs are cached as
JSON under <work>/recipe_runs (shared with recipe_vs_naive), so a stopped sweep resumes.
"""

import math
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_vs_naive as rvn  # noqa: E402
from knobs import parse_knobs  # noqa: E402

STAGES = {  # name: candidate overrides of the recipe
    "lr": [{"lr": 3e-4}, {"lr": 1e-3}],
    "lr3": [{"lr": 1e-4}, {"lr": 3e-4}, {"lr": 1e-3}],
    "cosine": [{"decay": "constant", "warmup": 0}, {"decay": "cosine", "warmup": 0}],
    "small_batch": [{"mbs": 4, "gbs": 4}, {"mbs": 2, "gbs": 2}],
    "tiny_batch": [{"mbs": 2, "gbs": 2}, {"mbs": 1, "gbs": 1}],
    "lr_low": [{"lr": 3e-4}, {"lr": 1e-4}],
    "lr_mid": [{"lr": 3e-4}, {"lr": 5e-4}],
    "axes": [{}, {"axes": "depth"}, {"axes": "hidden_size,ffn_hidden_size,num_attention_heads"}],
    "schedule": [{"decay": "constant", "warmup": 0}, {"decay": "cosine", "warmup": 0},
                 {"decay": "cosine", "warmup": 2}],
    "T": [{"T": 1.0}, {"T": 2.0}],
    "ce": [{"ce": 0.0}, {"ce": 0.5}],
    "batch": [{"mbs": 4, "gbs": 4}, {"mbs": 4, "gbs": 8}],
}
KNOBS = {"work": "/tmp/minitron_bench_smollm2", "tokens": 20480, "seeds": "1,2,3",
         "stages": "lr,schedule", "windows": 10, "threads": 2, "score": "select,report",
         "shard": "0/1"}


def main(argv):
    import torch
    from transformers import AutoTokenizer

    k = parse_knobs(argv, KNOBS)
    torch.set_num_threads(k["threads"])
    shard, shards = (int(x) for x in k["shard"].split("/"))
    fixtures = rvn.students(k["work"])
    tok = AutoTokenizer.from_pretrained(fixtures[1])
    wins = {s: rvn.windows(tok, k["work"], k["windows"], s) for s in ("select", "report")}
    texts = list(wins["select"])
    seeds = [int(s) for s in k["seeds"].split(",")]
    best = dict(rvn.NAMED["manual"])
    run_k = dict(k, **{"split": "select"})
    print(f"sweep at {k['tokens']:,} tokens, seeds {seeds}, from {best}")
    print(f"{'stage':<9}{'point':<34}" + "".join(f"{t:>22}" for t in texts) +
          f"{'mean loss':>16}")
    for stage in k["stages"].split(","):
        scored = []
        todo = [(dict(best, **point), s) for point in STAGES[stage] for s in seeds
                if rvn.cached_run("ours", dict(best, **point), run_k, s) is None]
        for recipe, s in todo[shard::shards]:  # this process's share of the stage's runs
            rvn.run_arm("ours", recipe, run_k, s, fixtures, wins)
        for recipe, s in todo:  # the other shards' runs: wait for their results
            while rvn.cached_run("ours", recipe, run_k, s) is None:
                time.sleep(10)
        for point in STAGES[stage]:
            recipe = dict(best, **point)
            runs = [rvn.run_arm("ours", recipe, run_k, s, fixtures, wins) for s in seeds]
            per_seed = [sum(r["losses"]["select"][t] for t in texts) / len(texts)
                        for r in runs]
            mean = sum(per_seed) / len(per_seed)
            cells = ""
            for t in texts:
                p = [math.exp(r["losses"]["select"][t]) for r in runs]
                cells += f"{sum(p) / len(p):>8.2f} [{min(p):.1f}-{max(p):.1f}]".rjust(22)
            label = ",".join(f"{a}={b}" for a, b in point.items()) or "(kept)"
            print(f"{stage:<9}{label:<34}{cells}{mean:>8.4f} [{min(per_seed):.3f}-"
                  f"{max(per_seed):.3f}]", flush=True)
            scored.append((mean, point))
        best = dict(best, **min(scored, key=lambda x: x[0])[1])
        print(f"{stage}: keep {min(scored, key=lambda x: x[0])[1]}", flush=True)
    print("chosen: " + " ".join(f"{a}={b}" for a, b in best.items()))
    return best


if __name__ == "__main__":
    main(sys.argv[1:])
