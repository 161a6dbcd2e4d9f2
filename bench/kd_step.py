"""Distillation benchmarks.

(a) Speed: the time of one distillation step (teacher forward + student forward/backward + KD
loss + optimizer step, through the training loop's KDStep) divided by the time of a student
training step (LMStep) plus a teacher forward pass on the same batch. Target: under 1.1. All
three run in one process, interleaved round by round (bench/stats.py); median and range of the
per-round ratio. Teacher: the llama_10m shape (8 layers, hidden 256, vocab 8192); student: the
same with half the layers (a depth-pruned student).

    python bench/kd_step.py --part a [--rounds 10] [--precision fp32|bf16] [--hidden]

(b) Peak memory of the logit loss, forward + backward, at a large vocabulary: the chunked
vocab-parallel loss (megatron_minitron.distill.losses) against a naive full-vocabulary fp32
version (log_softmax of both logits, KL, backward). Target: chunked <= 1/4 of naive.

    python bench/kd_step.py --part b          # vocab 49152 and 128256, 8192 tokens
    python bench/kd_step.py --part b --quick  # fewer tokens, well under a minute

Peak memory is the increase over the inputs (teacher and student logits, already allocated):
on CUDA torch.cuda.max_memory_allocated; on CPU each measurement runs in a fresh subprocess that
resets the kernel's peak-RSS counter (/proc/self/clear_refs, else ru_maxrss) once the inputs
exist and reads VmHWM after backward. Both variants write the student logits' gradient, which
is counted in both. A naive run that would not fit in this machine's free memory is skipped and
the vocabulary is measured again at the largest token count that fits.
"""

import argparse
import json
import resource
import subprocess
import sys
import time

from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import interleaved, ratio_summary  # noqa: E402

GIB = 1024 ** 3
NAIVE_FP32_COPIES = 5  # measured peak of the naive version, in tokens x vocab fp32 tensors


def naive_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    logq = F.log_softmax(student.float() / temperature, dim=-1)
    logp = F.log_softmax(teacher.float() / temperature, dim=-1)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1).mean()


def chunked_kl(student, teacher, temperature: float, chunk: int) -> torch.Tensor:
    from megatron_minitron.config.distill import DistillConfig
    from megatron_minitron.distill.losses import logit_distillation_loss

    cfg = DistillConfig(temperature=temperature, token_chunk_size=chunk or None)
    return logit_distillation_loss(student, teacher, cfg, reduction="mean").loss


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_cpu_peak() -> int:
    """Reset the peak-RSS counter if the kernel allows it; return the baseline to subtract."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _rss_bytes("VmRSS")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure(variant: str, vocab: int, tokens: int, dtype: str, chunk: int, device: str):
    """One run in this process: (peak extra bytes, seconds)."""
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    shape = (tokens, 1, vocab)  # [s, b, v], TP=1
    student = torch.randn(shape, dtype=dt, device=device).requires_grad_()
    teacher = torch.randn(shape, dtype=dt, device=device)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_cpu_peak()
    start = time.perf_counter()
    loss = naive_kl(student, teacher, 1.0) if variant == "naive" else chunked_kl(
        student, teacher, 1.0, chunk)
    loss.backward()
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_bytes("VmHWM") - base
    return peak, time.perf_counter() - start


def run_isolated(variant, vocab, tokens, dtype, chunk, device):
    if device == "cuda":  # the allocator's counters are exact in process
        return measure(variant, vocab, tokens, dtype, chunk, device)
    cmd = [sys.executable, __file__, "--child", variant, str(vocab), str(tokens), dtype,
           str(chunk)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    peak, seconds = json.loads(out.strip().splitlines()[-1])
    return peak, seconds


def free_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def rows_for(vocab: int, tokens: int, device: str):
    """(tokens, run naive?) pairs: the asked size, plus a smaller one if naive cannot fit."""
    fits = lambda n: NAIVE_FP32_COPIES * 4 * n * vocab < 0.8 * free_bytes(device)  # noqa: E731
    if fits(tokens):
        return [(tokens, True)]
    smaller = tokens // 2
    while smaller > 256 and not fits(smaller):
        smaller //= 2
    return [(tokens, False), (smaller, True)]


def step_speed(rounds: int, precision: str, seq: int, mbs: int, hidden: bool) -> None:
    """(a): KD step / (student LM step + teacher forward), interleaved in one process."""
    import dataclasses

    from megatron_minitron.config.loader import load_config
    from megatron_minitron.distill.kd_step import KDStep
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import initialize, teardown
    from megatron_minitron.training.lm_step import LMStep
    from megatron_minitron.training.loop import Trainer
    from megatron_minitron.training.metrics import MetricsWriter
    from megatron_minitron.training.optimizer import (attach_schedule_hooks, build_optimizer,
                                                      wrap_ddp)

    over = ["model=llama_10m", f"data.seq_length={seq}", f"train.micro_batch_size={mbs}",
            f"train.global_batch_size={mbs}", f"runtime.precision={precision}",
            "logger.backend=none", "train.train_iters=1000"]
    if hidden:
        over += ["distill.hidden_loss=cosine", "distill.layer_pairs=[[4,2],[8,4]]"]
    cfg = load_config(over)
    ctx = initialize(cfg.parallel, cfg.runtime)
    teacher_model = cfg.model
    student_model = dataclasses.replace(teacher_model, num_layers=teacher_model.num_layers // 2)
    cfg = dataclasses.replace(cfg, model=student_model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, student_model.vocab_size, (mbs, seq + 1), generator=g)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(mbs, seq),
             "position_ids": torch.arange(seq).expand(mbs, -1)}
    teacher = build_model(teacher_model, cfg.parallel, cfg.runtime, ctx.device)[0]
    teacher.eval().requires_grad_(False)

    def trainer(make_step):
        raw = build_model(student_model, cfg.parallel, cfg.runtime, ctx.device)
        step = make_step(raw)
        chunks = wrap_ddp(raw)
        opt, sched = build_optimizer(chunks, cfg.train.optimizer, cfg.train)
        attach_schedule_hooks(chunks, opt)
        return Trainer(cfg, ctx, chunks, step, opt, sched, None,
                       MetricsWriter("/tmp", cfg.logger, False), lambda s: None)

    kd = trainer(lambda raw: KDStep(cfg.distill, teacher, raw[0], ctx.tp_group,
                                    student_model.vocab_size, ctx.device, seed=0))
    lm = trainer(lambda raw: LMStep(ctx.device))
    it = iter(lambda: batch, None)  # the same batch forever

    def teacher_forward():
        with torch.no_grad():
            teacher(batch["tokens"], batch["position_ids"], None)

    fns = {"kd": lambda: kd.train_step(it), "lm": lambda: lm.train_step(it),
           "teacher": teacher_forward}
    print(f"(a) teacher {teacher_model.num_layers} layers, student {student_model.num_layers}"
          f", hidden {student_model.hidden_size}, vocab {student_model.padded_vocab_size}, "
          f"batch {mbs}x{seq}, {precision}, hidden-state loss: {cfg.distill.hidden_loss}, "
          f"threads {torch.get_num_threads()}")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    # wall time, then CPU time of this process (steadier when other jobs share the cores)
    for clock, what in ((time.perf_counter, "wall"), (time.process_time, "CPU")):
        times = interleaved(fns, rounds, clock=clock)
        base = [a + b for a, b in zip(times["lm"], times["teacher"])]
        print("  ".join(f"{k} {med(times[k]) * 1e3:.0f} ms" for k in fns) + f" ({what})")
        print(f"KD step / (student step + teacher forward), {what} time: "
              f"{ratio_summary(times['kd'], base)}")
    teardown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens (~1 minute on CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens (default 8192)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--chunk", type=int, default=0,
                        help="distill.token_chunk_size (0: the automatic size)")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=10, help="(a) timed rounds")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="(a)")
    parser.add_argument("--seq", type=int, default=256, help="(a) sequence length")
    parser.add_argument("--mbs", type=int, default=4, help="(a) micro-batch size")
    parser.add_argument("--hidden", action="store_true", help="(a) add two hidden-state pairs")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        variant, vocab, tokens, dtype, chunk = args.child
        print(json.dumps(measure(variant, int(vocab), int(tokens), dtype, int(chunk), "cpu")))
        return
    if args.part in ("a", "all"):
        step_speed(args.rounds, args.precision, args.seq, args.mbs, args.hidden)
    if args.part == "a":
        return
    tokens = args.tokens or (2048 if args.quick else 8192)
    print(f"(b) logit loss peak memory, forward+backward, {args.dtype} logits [s, 1, v], "
          f"chunk {args.chunk or 'auto'} tokens, device {device}")
    header = f"{'vocab':>7} {'tokens':>7} {'naive GiB':>10} {'chunked GiB':>12} {'ratio':>6} " \
             f"{'naive s':>8} {'chunked s':>10}"
    print(header)
    print("-" * len(header))
    for vocab in args.vocab:
        for n, run_naive in rows_for(vocab, tokens, device):
            c_peak, c_s = run_isolated("chunked", vocab, n, args.dtype, args.chunk, device)
            if run_naive:
                n_peak, n_s = run_isolated("naive", vocab, n, args.dtype, args.chunk, device)
                naive, ratio, n_time = f"{n_peak / GIB:10.2f}", f"{c_peak / n_peak:6.3f}", \
                    f"{n_s:8.1f}"
            else:
                need = NAIVE_FP32_COPIES * 4 * n * vocab / GIB
                naive, ratio, n_time = f"{'>' + format(need, '.0f'):>10}", f"{'-':>6}", \
                    f"{'skip':>8}"
            print(f"{vocab:7d} {n:7d} {naive} {c_peak / GIB:12.2f} {ratio} {n_time} "
                  f"{c_s:10.1f}", flush=True)


if __name__ == "__main__":
    main()
