"""Overhead of importance estimation: an importance pass over N samples (width hooks and layer
cosines, i.e. importance.depth_loss=false: the skip-one-layer losses are extra passes by
design) divided by a plain forward pass over the same samples, both through the same
forward-only pipeline schedule, interleaved round by round in one process. Target: < 1.1.

    python bench/importance_overhead.py [work=/tmp/minitron_bench_smollm2] [num_samples=8]
                                        [seq_length=256] [micro_batch_size=4] [rounds=5]
                                        [seq_aggregation=mean] [threads=0]

Printed: the median and range of the per-round ratio of wall-clock times, and of process CPU
times (steadier when other jobs share the cores; threads=1 steadies it further; 0 keeps
torch's default thread count).

The model is the SmolLM2-135M teacher (bench/smollm2.py); the tokens are random (the cost
does not depend on their values), so no dataset is built.
"""

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402
from knobs import parse_knobs  # noqa: E402
from stats import interleaved, ratio_summary  # noqa: E402

KNOBS = {"work": "/tmp/minitron_bench_smollm2", "num_samples": 8, "seq_length": 256,
         "micro_batch_size": 4, "rounds": 5, "seq_aggregation": "mean", "threads": 0}


def parse(argv):
    return parse_knobs(argv, KNOBS)


class CpuTimes:
    """Wraps functions to record the process CPU seconds of each call (beside stats'
    wall-clock), dropping the warm-up calls."""

    def __init__(self, warmup: int):
        self.warmup, self.times = warmup, {}

    def wrap(self, name, fn):
        self.times[name] = []

        def run():
            t = time.process_time()
            fn()
            self.times[name].append(time.process_time() - t)
        return run

    def measured(self, name):
        return self.times[name][self.warmup:]


def random_batches(n: int, s: int, b: int, vocab: int):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(n // b):
        ids = torch.randint(0, vocab, (b, s + 1), generator=g)  # [b, s+1]
        out.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(b, s),
                    "position_ids": torch.arange(s).expand(b, -1).contiguous()})
    return out


def main(argv):
    from megatron_minitron.checkpoint.dist import load, read_header
    from megatron_minitron.config.importance import ImportanceConfig
    from megatron_minitron.config.parallel import ParallelConfig
    from megatron_minitron.importance.runner import calibration_pass, compute_importance
    from megatron_minitron.models.builder import build_model

    k = parse(argv)
    if k["threads"]:
        torch.set_num_threads(k["threads"])
    teacher = smollm2.teacher_checkpoint(k["work"])
    model = read_header(teacher).model
    batches = random_batches(k["num_samples"], k["seq_length"], k["micro_batch_size"],
                             model.vocab_size)
    make_batches = lambda: iter(batches)  # noqa: E731
    cfg = ImportanceConfig(num_samples=len(batches) * k["micro_batch_size"],
                           micro_batch_size=k["micro_batch_size"], depth_loss=False,
                           seq_aggregation=k["seq_aggregation"])
    with smollm2._single_process() as ctx:
        chunks = build_model(model, ParallelConfig(), smollm2._runtime(), ctx.device)
        load(teacher, chunks, ctx=ctx)
        for c in chunks:
            c.eval()
        cpu = CpuTimes(warmup=1)
        times = interleaved({
            "forward": cpu.wrap("forward", lambda: calibration_pass(chunks, make_batches, ctx)),
            "importance": cpu.wrap("importance", lambda: compute_importance(
                chunks, model, cfg, make_batches, ctx)),
        }, rounds=k["rounds"], warmup=1)
    n = cfg.num_samples
    print(f"SmolLM2-135M, {n} samples x {k['seq_length']} tokens, micro-batch "
          f"{k['micro_batch_size']}, {torch.get_num_threads()} threads, device {ctx.device}")
    for name, ts in times.items():
        print(f"{name:>10}: {min(ts):.2f}-{max(ts):.2f} s per pass")
    print(f"importance / forward, wall: {ratio_summary(times['importance'], times['forward'])}")
    print(f"importance / forward, CPU:  "
          f"{ratio_summary(cpu.measured('importance'), cpu.measured('forward'))}")


if __name__ == "__main__":
    main(sys.argv[1:])
