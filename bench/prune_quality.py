"""Pruning quality by importance source: SmolLM2-135M pruned to about half its non-embedding
parameters (hidden_size and ffn_hidden_size, see bench/smollm2.py) with activation, weight
magnitude and random scores; held-out LM loss right after pruning, before any distillation.

    python bench/prune_quality.py [work=/tmp/minitron_bench_smollm2] [num_samples=64]
                                  [seq_length=256] [heldout=16] [fraction=0.5]

num_samples: calibration sequences for activation scores (the paper uses 1024; 64 keeps the
default run to a few minutes on 2 CPU cores). heldout: windows of seq_length tokens of The
Tempest (held out of the demo corpus) the loss is measured on. Everything is cached in work.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402
from knobs import parse_knobs  # noqa: E402

KNOBS = {"work": "/tmp/minitron_bench_smollm2", "num_samples": 64, "seq_length": 256,
         "heldout": 16, "fraction": 0.5}


def parse(argv):
    return parse_knobs(argv, KNOBS)


def main(argv):
    from megatron_minitron.checkpoint.dist import read_header

    k = parse(argv)
    rows = []
    t0 = time.perf_counter()
    teacher = smollm2.teacher_checkpoint(k["work"])
    rows.append(("teacher", teacher))
    for source in smollm2.SOURCES:
        rows.append((source, smollm2.pruned_checkpoint(
            k["work"], source, fraction=k["fraction"], num_samples=k["num_samples"],
            seq_length=k["seq_length"])))
    results = []
    for name, path in rows:
        model = read_header(path).model
        loss = smollm2.heldout_loss(path, k["heldout"], k["seq_length"])
        results.append((name, model, loss))
    print(f"\nSmolLM2-135M pruned to {k['fraction']:.0%} of its non-embedding parameters; "
          f"activation scores from {k['num_samples']} x {k['seq_length']} calibration tokens; "
          f"loss on {k['heldout']} x {k['seq_length']} held-out tokens "
          f"({time.perf_counter() - t0:.0f} s)")
    header = f"{'scores':<11} {'hidden':>6} {'ffn':>5} {'non-emb params':>15} {'held-out loss':>14}"
    print(header)
    print("-" * len(header))
    for name, model, loss in results:
        print(f"{name:<11} {model.hidden_size:>6} {model.ffn_hidden_size:>5} "
              f"{model.num_parameters(include_embeddings=False):>15,} {loss:>14.3f}")
    pruned = {name: loss for name, _, loss in results if name != "teacher"}
    best = min(pruned, key=pruned.get)
    verdict = "is" if best == "activation" else "is NOT"
    print(f"activation importance {verdict} the lowest held-out loss (best: {best})")
    return pruned


if __name__ == "__main__":
    main(sys.argv[1:])
