"""Distillation quality: SmolLM2-135M pruned to about half its non-embedding parameters
(activation scores, bench/smollm2.py), then retrained briefly on the demo corpus in two ways
with the same token budget: logit distillation from the unpruned teacher (`minitron distill`,
forward KL, no cross entropy, as Minitron recommends) and plain cross-entropy training
(`minitron train`). Held-out LM loss (The Tempest, not in the demo corpus) of the teacher, the
just-pruned student, the distilled student and the cross-entropy-retrained student.

    python bench/distill_quality.py [work=/tmp/minitron_bench_smollm2] [steps=96] [mbs=4]
                                    [seq_length=256] [heldout=16] [lr=0.001]
                                    [precision=bf16] [fraction=0.5]

steps x mbs x seq_length is the token budget of each retraining (global batch = mbs, one
micro-batch per step). precision: of both trainings (bf16: megatron mixed precision, fp32
master weights); held-out losses are computed in fp32. Runs are cached in work per knob set.
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import smollm2  # noqa: E402
from knobs import parse_knobs  # noqa: E402

KNOBS = {"work": "/tmp/minitron_bench_smollm2", "steps": 96, "mbs": 4, "seq_length": 256,
         "heldout": 16, "lr": 1e-3, "precision": "bf16", "fraction": 0.5}


def parse(argv):
    return parse_knobs(argv, KNOBS)


def retrain(stage: str, run_dir: Path, student: str, teacher: str, k) -> str:
    """The student after `steps` of distillation or cross-entropy training (cached)."""
    from megatron_minitron.checkpoint.dist import read_header, resolve
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.training.lm import distill, train_lm

    root = run_dir / "checkpoints"
    done = resolve(str(root))
    if done is not None and read_header(str(done)).step == k["steps"]:
        return str(root)
    overrides = [f"run.dir={run_dir}", f"checkpoint.load={student}",
                 f"train.train_iters={k['steps']}", f"train.micro_batch_size={k['mbs']}",
                 f"train.global_batch_size={k['mbs']}", f"data.seq_length={k['seq_length']}",
                 f"train.optimizer.lr={k['lr']}", f"train.optimizer.min_lr={k['lr'] / 10}",
                 "train.optimizer.lr_warmup_iters=2", "train.eval_interval=0",
                 "train.eval_iters=1", f"runtime.precision={k['precision']}",
                 "runtime.transformer_impl=local", "logger.backend=none",
                 "logger.progress_bar=false", "checkpoint.keep_last=1"]
    if stage == "distill":
        overrides.append(f"distill.teacher_checkpoint={teacher}")
    (distill if stage == "distill" else train_lm)(load_config(overrides))
    return str(root)


def main(argv):
    from megatron_minitron.checkpoint.dist import read_header

    k = parse(argv)
    t0 = time.perf_counter()
    teacher = smollm2.teacher_checkpoint(k["work"])
    pruned = smollm2.pruned_checkpoint(k["work"], "activation", fraction=k["fraction"])
    tag = f"{Path(pruned).name}_n{k['steps']}_b{k['mbs']}_s{k['seq_length']}_lr{k['lr']}_" \
          f"{k['precision']}"
    rows = [("teacher", teacher, 0.0), ("pruned", pruned, 0.0)]
    for stage in ("distill", "train"):
        start = time.perf_counter()
        path = retrain(stage, Path(k["work"]) / "retrain" / f"{stage}_{tag}", pruned, teacher, k)
        rows.append(("distilled (KD)" if stage == "distill" else "retrained (CE)", path,
                     time.perf_counter() - start))
    tokens = k["steps"] * k["mbs"] * k["seq_length"]
    results = [(name, read_header(path).model, smollm2.heldout_loss(
        path, k["heldout"], k["seq_length"]), secs) for name, path, secs in rows]
    print(f"\nSmolLM2-135M pruned to {k['fraction']:.0%} of its non-embedding parameters "
          f"(activation scores), retrained on {tokens:,} demo-corpus tokens ({k['steps']} steps "
          f"x {k['mbs']} x {k['seq_length']}, lr {k['lr']}, {k['precision']}); loss on "
          f"{k['heldout']} x {k['seq_length']} held-out tokens ({time.perf_counter() - t0:.0f} s)")
    header = f"{'model':<15} {'hidden':>6} {'ffn':>5} {'non-emb params':>15} " \
             f"{'held-out loss':>14} {'train s':>8}"
    print(header)
    print("-" * len(header))
    for name, model, loss, secs in results:
        print(f"{name:<15} {model.hidden_size:>6} {model.ffn_hidden_size:>5} "
              f"{model.num_parameters(include_embeddings=False):>15,} {loss:>14.3f} "
              f"{secs:>8.0f}")
    losses = {name: loss for name, _, loss, _ in results}
    kd, ce, pr = losses["distilled (KD)"], losses["retrained (CE)"], losses["pruned"]
    print(f"distillation recovers {pr - kd:.3f} nats of the {pr - losses['teacher']:.3f} lost "
          f"by pruning; cross entropy on the same tokens recovers {pr - ce:.3f}")
    return losses


if __name__ == "__main__":
    main(sys.argv[1:])
