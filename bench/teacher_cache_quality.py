"""Quality at equal tokens: a student distilled from the online teacher, from sampled caches
and from top-k caches (k in `ks`), over several seeds (the seed orders the data and draws the
samples). Tiny setting, so that it runs on a shared 2-core CPU: a 4-layer hidden-64 byte-level
teacher pretrained on the demo corpus, a 2-layer hidden-32 student from random init, the same
steps and batches for every method. Printed: the student's final validation LM loss (held-out
split) and KL estimate per method, mean and spread (min-max) over the seeds.

    python bench/teacher_cache_quality.py [work=/tmp/minitron_cache_quality] [seeds=3]
                                          [teacher_iters=150] [steps=40] [ks=8,32,128]
"""

import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knobs import parse_knobs  # noqa: E402

KNOBS = {"work": "/tmp/minitron_cache_quality", "seeds": 3, "teacher_iters": 150, "steps": 40,
         "ks": "8,32,128"}
BASE = ["data.tokenizer.type=byte", "data.seq_length=64", "train.micro_batch_size=8",
        "train.global_batch_size=8", "train.eval_interval=0", "train.eval_iters=4",
        "logger.backend=none", "logger.progress_bar=false", "train.optimizer.lr=3e-3",
        "train.optimizer.lr_warmup_iters=2", "runtime.precision=fp32"]
STUDENT = ["model.num_layers=2", "model.hidden_size=32"]


def run(stage, run_dir, overrides):
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.distill.cache_writer import write_cache
    from megatron_minitron.training.lm import distill, train_lm
    from megatron_minitron.training.metrics import read_metrics

    cfg = load_config(BASE + [f"run.dir={run_dir}"] + overrides)
    os.environ.pop("MASTER_PORT", None)  # a fresh rendezvous port for each run
    if stage == "cache":
        if not (Path(cfg.cache_output) / "index.json").is_file():
            write_cache(cfg)
        return None
    if not (Path(run_dir) / "checkpoints" / "latest").is_file():
        {"train": train_lm, "distill": distill}[stage](cfg)
    return [m for m in read_metrics(str(run_dir)) if "valid_lm_loss" in m][-1]


def main(argv):
    k = parse_knobs(argv, KNOBS)
    w = Path(k["work"])
    run("train", w / "teacher", [f"train.train_iters={k['teacher_iters']}"])
    teacher = str(w / "teacher" / "checkpoints")
    ks = [int(x) for x in k["ks"].split(",")]
    methods = {"online KD": []}
    methods.update({f"sampled k={n}": [] for n in ks})
    methods.update({f"top-{n} + tail": [] for n in ks})
    for seed in range(1, k["seeds"] + 1):
        common = [f"train.train_iters={k['steps']}", f"runtime.seed={seed}",
                  f"distill.teacher_checkpoint={teacher}"] + STUDENT
        methods["online KD"].append(run("distill", w / f"online_{k['steps']}_{seed}", common))
        for n in ks:
            cache = str(w / f"cache_{k['steps']}_{seed}_k{n}")
            run("cache", w / f"c{seed}", common[:3] + ["cache.mode=both", f"cache.k={n}",
                                                       f"cache.output={cache}"])
            for est, name in (("sampled", f"sampled k={n}"), ("topk", f"top-{n} + tail")):
                methods[name].append(run("distill", w / f"{est}{n}_{k['steps']}_{seed}", common + [
                    f"distill.teacher_cache={cache}",
                    f"distill.teacher_cache_estimator={est}"]))
    print(f"teacher: {teacher} ({k['teacher_iters']} steps); student 2 layers x 32 from "
          f"random init, {k['steps']} steps of 8 x 64 tokens, seeds 1..{k['seeds']}")
    print(f"{'method':<18} {'valid LM loss mean':>19} {'spread (min-max)':>18} "
          f"{'valid KD mean':>14}")
    for name, ms in methods.items():
        lm = [m["valid_lm_loss"] for m in ms]
        kd = [m["valid_kd_loss"] for m in ms]
        print(f"{name:<18} {statistics.mean(lm):>19.4f} {min(lm):>8.4f}-{max(lm):<9.4f} "
              f"{statistics.mean(kd):>14.4f}")


if __name__ == "__main__":
    main(sys.argv[1:])
