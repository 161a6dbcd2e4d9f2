"""Distillation benchmarks.

(a) Speed: the time of one distillation step (teacher forward + student forward/backward + KD
loss + optimizer step, through the training loop's KDStep) divided by the time of a student
training step (LMStep) plus a teacher forward pass on the same batch. Target: under 1.1. All
three run in one process, interleaved round by round (bench/stats.py); median and range of the
per-round ratio. Teacher: the llama_10m shape (8 layers, hidden 256, vocab 8192); student: the
same with half the layers (a depth-pruned student).

    python bench/kd_step.py --part a [--rounds 10] [--precision fp32|bf16] [--hidden]
    python bench/kd_step.py --part a --teacher CKPT --student CKPT [--peak-tflops 989]

With --teacher/--student, those checkpoints' models and weights instead (e.g. bench/smollm2.py's
fixtures). On a GPU it also prints each step's model FLOP utilisation: flops_per_token() x
tokens/s over --peak-tflops; the KD step counts the teacher's forward (about 6 x student +
2 x teacher parameters per token, plus attention). --json writes the figures to a file.

(b) Peak memory from the final hidden states onward: both output layers (student and teacher,
vocabulary x hidden) and the logit loss, forward + backward, at a large vocabulary. Three ways:
  naive    full logits of both models, fp32 log_softmax of each, kl_div, backward (what a
           transformers KD loop does);
  chunked  our unfused path: each output layer makes its full logits, the loss is chunked
           (distill.fused_output=false);
  fused    distill/fused_output.py: logits, loss and gradients chunk by chunk from the hidden
           states, no [tokens, vocab] tensor (distill.fused_output=true, the default).
The student's output weight has megatron DDP's fp32 main_grad buffer in every variant (it
exists before the step in training); the fused path accumulates into it as the training step
does, the others produce the weight's .grad as autograd does. Target: fused <= 0.05 x naive at
vocabulary 128,256, hidden 4,096, 8,192 tokens.

    python bench/kd_step.py --part b                 # vocab 128256, hidden 4096, 8192 tokens
    python bench/kd_step.py --part b --quick         # 2048 tokens
    python bench/kd_step.py --part b --vocab 49152 --hidden-size 576   # SmolLM2's head
    python bench/kd_step.py --part b --vocab 49152 --hidden-size 378 --teacher-hidden-size 576 \
        --tokens 2048 --speed-rounds 6     # the demo's heads, and chunked vs fused speed

Peak memory is the increase over the inputs (hidden states, weights, main_grad): on CUDA
torch.cuda.max_memory_allocated; on CPU each measurement runs in a fresh subprocess that
resets the kernel's peak-RSS counter (/proc/self/clear_refs, else ru_maxrss) once the inputs
exist and reads VmHWM after backward. A variant that would not fit in this machine's free
memory is skipped at that size, and all three are measured again at the largest token count
where every one fits, so each printed ratio compares measurements at the same size.
"""

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import interleaved, ratio_summary  # noqa: E402

GIB = 1024 ** 3


def naive_loss(hs, ws, ht, wt, temperature: float) -> torch.Tensor:
    logq = F.log_softmax((hs @ ws.t()).float() / temperature, dim=-1)  # [s, v] fp32
    with torch.no_grad():
        logp = F.log_softmax((ht @ wt.t()).float() / temperature, dim=-1)
    return F.kl_div(logq, logp, log_target=True, reduction="none").sum(-1).mean()


def chunked_loss(hs, ws, ht, wt, temperature: float, chunk: int) -> torch.Tensor:
    from megatron_minitron.config.distill import DistillConfig
    from megatron_minitron.distill.losses import logit_distillation_loss

    cfg = DistillConfig(temperature=temperature, token_chunk_size=chunk or None)
    with torch.no_grad():
        teacher = (ht @ wt.t()).unsqueeze(1)
    student = (hs @ ws.t()).unsqueeze(1)  # [s, 1, v]
    return logit_distillation_loss(student, teacher, cfg, reduction="mean").loss


def fused_loss(hs, ws, ht, wt, temperature: float, chunk: int) -> torch.Tensor:
    from megatron_minitron.config.distill import DistillConfig
    from megatron_minitron.distill.fused_output import fused_logit_distillation_loss

    cfg = DistillConfig(temperature=temperature, token_chunk_size=chunk or None)
    return fused_logit_distillation_loss(hs.unsqueeze(1), ws, ht.unsqueeze(1), wt, cfg,
                                         reduction="mean", grad_scale=1.0).loss


VARIANTS = {"naive": naive_loss, "chunked": chunked_loss, "fused": fused_loss}
FP32_COPIES = {"naive": 7, "chunked": 3, "fused": 0}
"""Roughly how many [tokens, vocab] fp32 tensors each variant holds at its peak (for skipping
sizes that cannot fit)."""


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


def make_inputs(vocab: int, tokens: int, dtype: str, device: str, hidden: int,
                teacher_hidden: int):
    """(hs, ws, ht, wt): both models' final hidden states and output weights; the student's
    weight has megatron DDP's fp32 main_grad, touched (it exists before the step in training)."""
    dt = getattr(torch, dtype)
    torch.manual_seed(0)
    hs = torch.randn(tokens, hidden, dtype=dt, device=device).requires_grad_()
    ht = torch.randn(tokens, teacher_hidden, dtype=dt, device=device)
    ws = (torch.randn(vocab, hidden, dtype=dt, device=device) * hidden ** -0.5).requires_grad_()
    wt = torch.randn(vocab, teacher_hidden, dtype=dt, device=device) * teacher_hidden ** -0.5
    ws.main_grad = torch.zeros(vocab, hidden, dtype=torch.float32, device=device)
    ws.main_grad.fill_(0)
    return hs, ws, ht, wt


def run_variant(variant: str, inputs, chunk: int) -> None:
    hs, ws, ht, wt = inputs
    hs.grad = ws.grad = None
    fn = VARIANTS[variant]
    loss = fn(hs, ws, ht, wt, 1.0) if variant == "naive" else fn(hs, ws, ht, wt, 1.0, chunk)
    loss.backward()


def measure(variant: str, vocab: int, tokens: int, dtype: str, chunk: int, device: str,
            hidden: int, teacher_hidden: int):
    """One run in this process: (peak extra bytes, seconds)."""
    import megatron_minitron.distill.fused_output  # noqa: F401  (imports outside the window)
    import megatron_minitron.distill.losses  # noqa: F401

    inputs = make_inputs(vocab, tokens, dtype, device, hidden, teacher_hidden)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = _reset_cpu_peak()
    start = time.perf_counter()
    run_variant(variant, inputs, chunk)
    if device == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = _rss_bytes("VmHWM") - base
    return peak, time.perf_counter() - start


def speed(vocab: int, tokens: int, dtype: str, chunk: int, device: str, hidden: int,
          teacher_hidden: int, rounds: int) -> None:
    """The unfused (chunked) and fused paths timed in this process, interleaved round by round
    on the same inputs (the memory table's seconds are single runs in fresh processes)."""
    from megatron_minitron.runtime.allocator import keep_freed_memory

    if device == "cpu":
        keep_freed_memory()  # as in training (runtime/distributed.py's initialize)
    inputs = make_inputs(vocab, tokens, dtype, device, hidden, teacher_hidden)

    def timed(variant):
        def run():
            run_variant(variant, inputs, chunk)
            if device == "cuda":
                torch.cuda.synchronize()
        return run

    times = interleaved({v: timed(v) for v in ("chunked", "fused")}, rounds)
    for v, ts in times.items():
        print(f"  {v:>8}: {tokens / statistics.median(ts):9.0f} tokens/s "
              f"(median of {rounds} rounds, {min(ts):.2f}-{max(ts):.2f} s per step)")
    print(f"  tokens/s ratio fused / chunked: {ratio_summary(times['chunked'], times['fused'])}")


def run_isolated(variant, vocab, tokens, dtype, chunk, device, hidden, teacher_hidden):
    if device == "cuda":  # the allocator's counters are exact in process
        return measure(variant, vocab, tokens, dtype, chunk, device, hidden, teacher_hidden)
    cmd = [sys.executable, __file__, "--child", variant, str(vocab), str(tokens), dtype,
           str(chunk), str(hidden), str(teacher_hidden)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    peak, seconds = json.loads(out.strip().splitlines()[-1])
    return peak, seconds


def free_bytes(device: str) -> int:
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def fits(variant: str, vocab: int, tokens: int, hidden: int, device: str) -> bool:
    inputs = 4 * (4 * vocab * hidden + 2 * tokens * hidden)
    need = inputs + 4 * FP32_COPIES[variant] * tokens * vocab + 4 * vocab * hidden
    return need < 0.8 * free_bytes(device)


def sizes_for(vocab: int, tokens: int, hidden: int, device: str):
    """Token counts to measure: the asked one, plus the largest smaller one where all fit."""
    out = [tokens]
    n = tokens
    while n > 256 and not all(fits(v, vocab, n, hidden, device) for v in VARIANTS):
        n //= 2
    if n != tokens:
        out.append(n)
    return out


def flops_per_token(model, seq: int, training: bool) -> float:
    """Matrix FLOPs per token of one forward (training=False) or forward + backward (3x): 2 per
    weight of the layers and of the output layer (vocab x hidden, tied or not; the embedding
    lookup is free), plus causal attention's scores and context, 2 x 2 x seq/2 x heads x
    kv_channels per layer (half the [seq, seq] square)."""
    weights = model.num_parameters(include_embeddings=False) + \
        model.padded_vocab_size * model.hidden_size
    attention = 2 * model.num_layers * seq * model.num_attention_heads * model.kv_channels
    forward = 2 * weights + attention
    return 3 * forward if training else forward


def bench_trainer(cfg, ctx, model, checkpoint, make_step):
    """A Trainer around one step object for timing: the model (loaded from `checkpoint` if
    given), DDP and the optimizer; no data source, metrics kept nowhere."""
    from megatron_minitron.checkpoint import dist as ckpt
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.training.loop import Trainer
    from megatron_minitron.training.metrics import MetricsWriter
    from megatron_minitron.training.optimizer import (attach_schedule_hooks, build_optimizer,
                                                      wrap_ddp)

    raw = build_model(model, cfg.parallel, cfg.runtime, ctx.device)
    if checkpoint:
        ckpt.load(checkpoint, raw, ctx=ctx)
    step = make_step(raw)
    chunks = wrap_ddp(raw)
    opt, sched = build_optimizer(chunks, cfg.train.optimizer, cfg.train)
    attach_schedule_hooks(chunks, opt)
    return Trainer(cfg, ctx, chunks, step, opt, sched, None,
                   MetricsWriter("/tmp", cfg.logger, False), lambda s: None)


def step_speed(rounds: int, precision: str, seq: int, mbs: int, hidden: bool,
               teacher_ckpt: str = None, student_ckpt: str = None, peak_tflops: float = None,
               json_out: str = None) -> None:
    """(a): KD step / (student LM step + teacher forward), interleaved in one process."""
    import dataclasses

    from megatron_minitron.checkpoint import dist as ckpt
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.distill.kd_step import KDStep
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import initialize, teardown
    from megatron_minitron.training.lm_step import LMStep

    over = ["model=llama_10m", f"data.seq_length={seq}", f"train.micro_batch_size={mbs}",
            f"train.global_batch_size={mbs}", f"runtime.precision={precision}",
            "logger.backend=none", "train.train_iters=1000"]
    if hidden:
        over += ["distill.hidden_loss=cosine", "distill.layer_pairs=[[4,2],[8,4]]"]
    cfg = load_config(over)
    ctx = initialize(cfg.parallel, cfg.runtime)
    teacher_model = cfg.model
    student_model = dataclasses.replace(teacher_model, num_layers=teacher_model.num_layers // 2)
    if teacher_ckpt:
        teacher_model = ckpt.read_header(teacher_ckpt).model
        student_model = ckpt.read_header(student_ckpt).model
    cfg = dataclasses.replace(cfg, model=student_model)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, student_model.vocab_size, (mbs, seq + 1), generator=g)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(mbs, seq),
             "position_ids": torch.arange(seq).expand(mbs, -1)}
    teacher = build_model(teacher_model, cfg.parallel, cfg.runtime, ctx.device)
    if teacher_ckpt:
        ckpt.load(teacher_ckpt, teacher)
    teacher = teacher[0].eval().requires_grad_(False)

    def trainer(make_step):
        return bench_trainer(cfg, ctx, student_model, student_ckpt, make_step)

    kd = trainer(lambda raw: KDStep(cfg.distill, teacher, raw[0], ctx.tp_group,
                                    student_model.vocab_size, ctx.device, seed=0))
    lm = trainer(lambda raw: LMStep(ctx.device))
    it = iter(lambda: batch, None)  # the same batch forever

    tokens_on_device = batch["tokens"].to(ctx.device)
    positions_on_device = batch["position_ids"].to(ctx.device)

    def teacher_forward():
        with torch.no_grad():
            teacher(tokens_on_device, positions_on_device, None)

    def synced(fn):  # CUDA runs asynchronously: a step ends when its kernels have
        def run():
            fn()
            if ctx.device.type == "cuda":
                torch.cuda.synchronize()
        return run

    fns = {"kd": synced(lambda: kd.train_step(it)), "lm": synced(lambda: lm.train_step(it)),
           "teacher": synced(teacher_forward)}
    where = torch.cuda.get_device_name() if ctx.device.type == "cuda" else \
        f"CPU, threads {torch.get_num_threads()}"
    print(f"(a) teacher {teacher_model.num_layers} layers hidden {teacher_model.hidden_size}, "
          f"student {student_model.num_layers} layers hidden {student_model.hidden_size} ffn "
          f"{student_model.ffn_hidden_size}, vocab {student_model.padded_vocab_size}, batch "
          f"{mbs}x{seq}, {precision}, hidden-state loss: {cfg.distill.hidden_loss}, {where}")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    tokens = mbs * seq  # per step
    flops = {"kd": flops_per_token(student_model, seq, True) +
             flops_per_token(teacher_model, seq, False),
             "lm": flops_per_token(student_model, seq, True),
             "teacher": flops_per_token(teacher_model, seq, False)}
    record = {"device": where, "batch": [mbs, seq], "precision": precision,
              "teacher_params": teacher_model.num_parameters(),
              "student_params": student_model.num_parameters(),
              "flops_per_token": flops, "peak_tflops": peak_tflops}
    # wall time, then CPU time of this process (steadier when other jobs share the cores)
    for clock, what in ((time.perf_counter, "wall"), (time.process_time, "CPU")):
        times = interleaved(fns, rounds, clock=clock)
        base = [a + b for a, b in zip(times["lm"], times["teacher"])]
        print("  ".join(f"{k} {med(times[k]) * 1e3:.0f} ms" for k in fns) + f" ({what})")
        print(f"KD step / (student step + teacher forward), {what} time: "
              f"{ratio_summary(times['kd'], base)}")
        record[what] = {"median_s": {k: med(v) for k, v in times.items()},
                        "kd_over_lm_plus_teacher": ratio_summary(times["kd"], base)}
    wall = record["wall"]["median_s"]
    for k in fns:
        tps = tokens / wall[k]
        line = f"{k:>7}: {tps:9.0f} tokens/s, {flops[k] / 1e6:.1f} MFLOP/token"
        record.setdefault("tokens_per_s", {})[k] = tps
        if peak_tflops and ctx.device.type == "cuda":
            mfu = tps * flops[k] / (peak_tflops * 1e12)
            record.setdefault("mfu", {})[k] = mfu
            line += f", MFU {100 * mfu:.1f} % of {peak_tflops:g} TFLOP/s"
        print(line)
    if json_out:
        Path(json_out).write_text(json.dumps(record, indent=2) + "\n")
    teardown()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer tokens (~1 minute on CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="tokens (default 8192)")
    parser.add_argument("--vocab", type=int, nargs="+", default=[128256])
    parser.add_argument("--hidden-size", type=int, default=4096, help="(b) output layer width")
    parser.add_argument("--teacher-hidden-size", type=int, default=None,
                        help="(b) the teacher's output layer width (default: --hidden-size)")
    parser.add_argument("--speed-rounds", type=int, default=0,
                        help="(b) then time chunked and fused interleaved in one process, "
                        "this many rounds, at the first token count")
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float32"],
                        help="(b) default: bfloat16 on GPU, float32 on CPU")
    parser.add_argument("--chunk", type=int, default=0,
                        help="distill.token_chunk_size (0: the automatic size)")
    parser.add_argument("--child", nargs=7, help=argparse.SUPPRESS)
    parser.add_argument("--part", choices=["a", "b", "all"], default="all")
    parser.add_argument("--rounds", type=int, default=10, help="(a) timed rounds")
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32", help="(a)")
    parser.add_argument("--seq", type=int, default=256, help="(a) sequence length")
    parser.add_argument("--mbs", type=int, default=4, help="(a) micro-batch size")
    parser.add_argument("--hidden", action="store_true", help="(a) add two hidden-state pairs")
    parser.add_argument("--teacher", help="(a) teacher checkpoint (default: llama_10m shape)")
    parser.add_argument("--student", help="(a) student checkpoint (with --teacher)")
    parser.add_argument("--peak-tflops", type=float, help="(a) the device's peak, for MFU")
    parser.add_argument("--json", help="(a) write the figures to this file")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.child:
        variant, vocab, tokens, dtype, chunk, hidden, teacher_hidden = args.child
        print(json.dumps(measure(variant, int(vocab), int(tokens), dtype, int(chunk), "cpu",
                                 int(hidden), int(teacher_hidden))))
        return
    if args.part in ("a", "all"):
        if bool(args.teacher) != bool(args.student):
            parser.error("--teacher and --student go together")
        step_speed(args.rounds, args.precision, args.seq, args.mbs, args.hidden, args.teacher,
                   args.student, args.peak_tflops, args.json)
    if args.part == "a":
        return
    tokens = args.tokens or (2048 if args.quick else 8192)
    dtype = args.dtype or ("bfloat16" if device == "cuda" else "float32")
    h = args.hidden_size
    ht = args.teacher_hidden_size or h
    print(f"(b) output layers + logit loss from the final hidden states, forward+backward, "
          f"{dtype}, hidden {h} (teacher {ht}), chunk {args.chunk or 'auto'} tokens, "
          f"device {device}")
    header = (f"{'vocab':>7} {'tokens':>7} {'naive GiB':>10} {'chunked GiB':>12} "
              f"{'fused GiB':>10} {'chunked/naive':>14} {'fused/naive':>12} {'naive s':>8} "
              f"{'chunked s':>10} {'fused s':>8}")
    print(header)
    print("-" * len(header))
    for vocab in args.vocab:
        for n in sizes_for(vocab, tokens, h, device):
            res = {v: run_isolated(v, vocab, n, dtype, args.chunk, device, h, ht)
                   if fits(v, vocab, n, max(h, ht), device) else None for v in VARIANTS}
            gib = {v: f"{r[0] / GIB:.2f}" if r else "skip" for v, r in res.items()}
            sec = {v: f"{r[1]:.1f}" if r else "-" for v, r in res.items()}
            naive = res["naive"]
            ratio = {v: f"{res[v][0] / naive[0]:.3f}" if naive and res[v] else "-"
                     for v in ("chunked", "fused")}
            print(f"{vocab:7d} {n:7d} {gib['naive']:>10} {gib['chunked']:>12} "
                  f"{gib['fused']:>10} {ratio['chunked']:>14} {ratio['fused']:>12} "
                  f"{sec['naive']:>8} {sec['chunked']:>10} {sec['fused']:>8}", flush=True)
    if args.speed_rounds:
        for vocab in args.vocab:
            print(f"speed at vocabulary {vocab}, {tokens} tokens:")
            speed(vocab, tokens, dtype, args.chunk, device, h, ht, args.speed_rounds)


if __name__ == "__main__":
    main()
