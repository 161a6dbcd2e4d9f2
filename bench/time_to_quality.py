"""Held-out quality per minute of wall time: our distillation step against the naive
transformers KD loop in fp32 and in pure bf16, from the same pruned student, with the same
teacher and the same samples in the same order, each trained for the same wall-clock budget.

Teacher: SmolLM2-135M (bench/smollm2.py). Student: the demo's, the teacher pruned to 15 of 30
layers by layer cosine (bench/recipe_vs_naive.py's depth student). Arms:

    ours        `minitron distill`'s step (KDStep in the one training loop, fused output-layer
                forward KL) with the demo's recipe (2 x 256 tokens per step, AdamW at a
                constant 3e-4, T=1), runtime.precision=auto: bf16 (fp32 master weights and
                gradient accumulation) on a CPU with native bf16, fp32 elsewhere
    naive_fp32  the naive loop of bench/kd_vs_hf.py (teacher forward, student forward, fp32
                log_softmax of both full logits, kl_div, AdamW at 3e-4), 4 x 256 per step, fp32
    naive_bf16  the same loop with both models and AdamW's state in bf16 (no fp32 master copy)

    python bench/time_to_quality.py [budgets=2,4] [seeds=1,2,3] [arms=ours,naive_fp32,naive_bf16]
        [eval_every=30] [windows=4] [threads=2] [work=/tmp/minitron_bench_smollm2]

budgets: minutes of training wall time (perf_counter around the optimizer steps only; the
held-out evaluations are not counted). Every `eval_every` seconds of training, and once as
soon as each budget is spent, the student is scored: its weights (bf16 ones upcast) loaded
into a Hugging Face fp32 model of its shape, next-token loss on `windows` x 256 tokens of the
second (report) half of each held-out text (bench/heldout_texts.py: The Tempest, The Devil's
Dictionary, Webster 1913, the Jargon File; the training corpus is the demo's Shakespeare).
Prints, over seeds (mean [min-max]): each arm's held-out perplexity at each budget, per text
and averaged over texts (mean loss); the minutes each arm needed to reach each naive loop's
mean held-out loss at the last budget (interpolated between evaluations; "not reached"
otherwise) and the ratio to that loop's own minutes; verdicts "beyond the spread" (mean gap
larger than both arms' seed ranges) or "within noise". Every finished run is cached as JSON
under <work>/time_runs, keyed by its knobs and the CPU's model name.
"""

import hashlib
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import recipe_vs_naive as rvn  # noqa: E402
from knobs import parse_knobs  # noqa: E402

SEQ = rvn.SEQ
KNOBS = {"budgets": "2,4", "seeds": "1,2,3", "arms": "ours,naive_fp32,naive_bf16",
         "eval_every": 30, "windows": 4, "threads": 2, "work": "/tmp/minitron_bench_smollm2"}
ARMS = {"ours": 2, "naive_fp32": 4, "naive_bf16": 4}
"""Samples of SEQ tokens per optimizer step: the demo's recipe (recipe_vs_naive.CHOSEN) and
the naive loop's (recipe_vs_naive.NAIVE)."""
POOL = 4096
"""Training samples drawn per seed (1M tokens): more than any arm reads in 8 minutes here."""


def sample_pool(teacher_ckpt: str, seed: int):
    """POOL training samples of the demo corpus in the seed's order, from the data stage's
    build_datasets (tokens, labels, loss_mask, position_ids of SEQ tokens each)."""
    from megatron_minitron.config.data import DataConfig
    from megatron_minitron.data.datasets import build_datasets
    from megatron_minitron.eval.perplexity import checkpoint_tokenizer

    train = build_datasets(DataConfig(seq_length=SEQ), checkpoint_tokenizer(teacher_ckpt),
                           (POOL, 0, 0), seed)[0]
    return train


def batches(train, per_step: int):
    """Endless micro-batches of `per_step` consecutive samples (wrapping around the pool)."""
    i = 0
    while True:
        rows = [train[(i + j) % len(train)] for j in range(per_step)]
        i += per_step
        yield {k: torch.stack([torch.as_tensor(r[k]) for r in rows])
               for k in ("tokens", "labels", "loss_mask", "position_ids")}


class Scorer:
    """Held-out losses of a student's current weights in a Hugging Face fp32 model."""

    def __init__(self, student_hf: str, wins):
        from transformers import AutoModelForCausalLM

        self.model = AutoModelForCausalLM.from_pretrained(student_hf, dtype=torch.float32)
        self.wins = wins

    def __call__(self, state_dict) -> dict:
        missing, unexpected = self.model.load_state_dict(
            {k: v.float() for k, v in state_dict.items()}, strict=False)
        tied = getattr(self.model.config, "tie_word_embeddings", False)
        if unexpected or any(not (tied and m == "lm_head.weight") for m in missing):
            raise RuntimeError(f"student weights do not fit the HF model: missing {missing}, "
                               f"unexpected {unexpected}")
        return rvn.model_losses(self.model, self.wins)


def _ours_weights(trainer):
    """Our student's weights under Hugging Face names (models/builder.unwrap's GPTModel)."""
    from megatron_minitron.checkpoint import hf_keymap
    from megatron_minitron.models.builder import unwrap

    gpt = unwrap(trainer.chunks[0])
    sd = {k: v for k, v in gpt.state_dict().items() if "_extra_state" not in k}
    model = trainer.cfg.model
    return hf_keymap.mcore_to_hf_state_dict(sd, model, hf_keymap.default_model_type(model))


def run_arm(arm: str, seed: int, k: dict, fixtures, scorer: Scorer) -> dict:
    """[(training seconds, tokens, {text: loss})...] of one arm and seed until the last
    budget is spent."""
    teacher_ckpt, teacher_hf, student_ckpt, student_hf = fixtures
    budgets = [60.0 * float(b) for b in k["budgets"].split(",")]
    per_step = ARMS[arm]
    torch.manual_seed(seed)
    data = batches(sample_pool(teacher_ckpt, seed), per_step)
    if arm == "ours":
        from kd_vs_hf import ours

        from megatron_minitron.runtime.distributed import teardown

        knobs = {"seq": SEQ, "mbs": per_step, "precision": "auto", "device": "cpu",
                 "fused": "true"}
        trainer, _ = ours(knobs, teacher_ckpt, student_ckpt,
                          ["train.optimizer.lr_decay_style=constant", f"runtime.seed={seed}"])
        from megatron_minitron.runtime.device import resolve_precision

        precision = resolve_precision(trainer.cfg.runtime, "cpu")
        step = lambda: trainer.train_step(data)  # noqa: E731
        weights = lambda: _ours_weights(trainer)  # noqa: E731
    else:
        from kd_vs_hf import naive

        precision = arm.split("_")[1]
        naive_step = naive({"precision": precision}, teacher_hf, student_hf,
                           torch.device("cpu"))
        step = lambda: naive_step(next(data)["tokens"])  # noqa: E731
        weights = lambda: naive_step.student.state_dict()  # noqa: E731
    curve = [(0.0, 0, scorer(weights()))]
    spent, tokens, next_eval = 0.0, 0, float(k["eval_every"])
    pending = sorted(budgets)
    while pending:
        t = time.perf_counter()
        step()
        spent += time.perf_counter() - t
        tokens += per_step * SEQ
        if spent >= next_eval or spent >= pending[0]:
            curve.append((spent, tokens, scorer(weights())))
            while spent >= next_eval:
                next_eval += k["eval_every"]
            while pending and spent >= pending[0]:
                pending.pop(0)
    if arm == "ours":
        del trainer
        teardown()
    return {"arm": arm, "seed": seed, "precision": precision, "curve": curve}


def _run_path(arm: str, seed: int, k: dict) -> Path:
    from kd_vs_hf import cpu_description

    spec = {"arm": arm, "seed": seed, "budgets": k["budgets"], "eval_every": k["eval_every"],
            "windows": k["windows"], "threads": k["threads"], "cpu": cpu_description()}
    key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:10]
    return Path(k["work"]) / "time_runs" / f"{arm}_{key}_s{seed}.json"


def mean_loss(losses: dict) -> float:
    return sum(losses.values()) / len(losses)


def at_budget(curve, budget_s: float) -> dict:
    """The losses of the first evaluation at or after budget_s of training."""
    return next(losses for spent, _, losses in curve if spent >= budget_s)


def minutes_to(curve, target: float):
    """Training minutes until the mean held-out loss first reaches `target` (linear between
    evaluations), or None."""
    prev = None
    for spent, _, losses in curve:
        loss = mean_loss(losses)
        if loss <= target:
            if prev is None:
                return 0.0
            (s0, l0) = prev
            return (s0 + (spent - s0) * (l0 - target) / (l0 - loss)) / 60
        prev = (spent, loss)
    return None


def spread(xs):
    return f"{statistics.mean(xs):.2f} [{min(xs):.2f}-{max(xs):.2f}]"


def verdict(a, b) -> str:
    """'beyond the spread' when the gap of the means is larger than both seed ranges."""
    gap = abs(statistics.mean(a) - statistics.mean(b))
    return "beyond the spread" if gap > max(max(a) - min(a), max(b) - min(b)) else \
        "within noise"


def main(argv):
    k = parse_knobs(argv, KNOBS)
    torch.set_num_threads(k["threads"])
    from transformers import AutoTokenizer

    from kd_vs_hf import cpu_description

    from megatron_minitron.checkpoint.smollm2 import fetch_smollm2

    work = k["work"]
    teacher_ckpt = rvn.smollm2.teacher_checkpoint(work)
    teacher_hf = str(fetch_smollm2())
    student_ckpt = rvn.student_for(rvn.CHOSEN, work, None)
    student_hf = rvn.depth_student_hf(work, None)
    fixtures = (teacher_ckpt, teacher_hf, student_ckpt, student_hf)
    wins = rvn.windows(AutoTokenizer.from_pretrained(teacher_hf), work, k["windows"], "report")
    scorer = Scorer(student_hf, wins)
    texts = list(wins)
    budgets = [float(b) for b in k["budgets"].split(",")]
    seeds = [int(s) for s in k["seeds"].split(",")]
    arms = k["arms"].split(",")
    runs = {arm: [] for arm in arms}
    for seed in seeds:  # seeds outermost: a partial run still covers every arm
        for arm in arms:
            path = _run_path(arm, seed, k)
            if not path.is_file():
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(run_arm(arm, seed, k, fixtures, scorer)))
            r = json.loads(path.read_text())
            runs[arm].append(r)
            last = r["curve"][-1]
            print(f"[{arm} ({r['precision']}) seed {seed}: {last[1]:,} tokens in "
                  f"{last[0] / 60:.1f} min, held-out perplexity (mean loss) "
                  f"{math.exp(mean_loss(last[2])):.1f}]", flush=True)

    print(f"\nCPU: {cpu_description()}")
    print(f"student: SmolLM2-135M pruned to 15 of 30 layers; seeds {seeds}; held-out: "
          f"{k['windows']} x {SEQ} tokens of the report half of each text; mean [min-max] over "
          f"seeds; training wall time only")
    for b in budgets:
        print(f"\nafter {b:g} min of training: held-out perplexity")
        print(f"{'arm':<20}" + "".join(f"{t:>26}" for t in texts) + f"{'mean loss':>22}"
              f"{'tokens':>10}")
        for arm in arms:
            rows = [at_budget(r["curve"], 60 * b) for r in runs[arm]]
            toks = [next(n for s, n, _ in r["curve"] if s >= 60 * b) for r in runs[arm]]
            name = f"{arm} ({runs[arm][0]['precision']})"
            print(f"{name:<20}" + "".join(
                spread([math.exp(x[t]) for x in rows]).rjust(26) for t in texts)
                + spread([mean_loss(x) for x in rows]).rjust(22)
                + f"{statistics.mean(toks):>10,.0f}")
        if "ours" in arms:
            mine = [mean_loss(at_budget(r["curve"], 60 * b)) for r in runs["ours"]]
            for arm in arms:
                if arm != "ours":
                    other = [mean_loss(at_budget(r["curve"], 60 * b)) for r in runs[arm]]
                    print(f"  ours vs {arm}: mean held-out loss {statistics.mean(mine):.3f} vs "
                          f"{statistics.mean(other):.3f}: {verdict(mine, other)}")
    last = budgets[-1]
    for ref in (a for a in arms if a.startswith("naive")):
        print(f"\nminutes to reach {ref}'s mean held-out loss after {last:g} min (per seed):")
        for arm in arms:
            ts = []
            for r, rr in zip(runs[arm], runs[ref]):
                target = mean_loss(at_budget(rr["curve"], 60 * last))
                ts.append(minutes_to(r["curve"], target))
            own = [next(s for s, _, _ in rr["curve"] if s >= 60 * last) / 60 for rr in runs[ref]]
            shown = ", ".join("not reached" if t is None else f"{t:.2f}" for t in ts)
            ratio = ", ".join("-" if t is None else f"{t / o:.2f}x" for t, o in zip(ts, own))
            print(f"  {arm:<12} {shown}  ({ratio} of {ref}'s own minutes)")


if __name__ == "__main__":
    main(sys.argv[1:])
