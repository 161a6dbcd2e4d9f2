"""Our distillation step against the naive transformers KD loop a user writes in an afternoon,
on the same teacher (SmolLM2-135M) and the same student (the teacher pruned to half its
non-embedding parameters by our importance + prune stages, exported to Hugging Face for the
naive side), the same tokens per optimizer step, interleaved round by round in one process.

Naive step (transformers): teacher forward under no_grad, student forward, fp32 log_softmax of
both full-vocabulary logits, kl_div(log_target, batchmean), backward, AdamW step.
Ours: `minitron distill`'s step (KDStep in the one training loop: megatron-core GPTModel, DDP,
megatron optimizer with clipping, fused output-layer forward-KL loss unless fused=false).

    python bench/kd_vs_hf.py [rounds=5] [mbs=4] [seq=512] [precision=fp32|bf16] [fused=true]
                             [device=auto|cpu|cuda] [teacher=smollm2|random] [profile=0]
                             [shapes=false] [sides=ours,naive] [chunk=0]

teacher=random needs no download (machines without the internet, such as the lent GPU): the
teacher is SmolLM2-135M's shape randomly initialised and the student is it pruned by magnitude
scores (bench/smollm2.py), both made on the spot; the speed comparison holds, the loss values
mean nothing.

Prints tokens/s (median and range over rounds), peak extra RSS per step (CPU: the kernel's
high-water mark, reset before each step after glibc's retained free memory is handed back;
GPU: peak allocated; two untimed steps each after the timed rounds), on CPU the time of the
step's matrix products alone, linear layers and attention, at this machine's speed
timed in the step's precision (bench/matmul_floor.py: the most tokens/s any implementation of
the step in that precision could reach) and each side's share of it, and last the ratio ours / naive. Both steps run in one process,
so both get what the process setup gives (our runtime's allocator settings included).
The CPU model and its bf16 flags are printed first: state them with any figure.
profile=N (N > 0): then each side's top N operators over 2 profiled steps (bench/op_profile.py);
shapes=true: one row per operator and input shapes; sides=ours: profile our step only.
chunk=N: distill.token_chunk_size (rows of the fused loss's chunks; 0: its default).
"""

import sys
import time
from pathlib import Path

import torch

from megatron_minitron.runtime.allocator import release_freed_memory

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knobs import parse_knobs  # noqa: E402
from matmul_floor import step_floor  # noqa: E402
from op_profile import top_ops  # noqa: E402
from stats import interleaved, ratio_summary  # noqa: E402

WORK = "/tmp/minitron_bench_smollm2"
DEFAULTS = {"rounds": 5, "mbs": 4, "seq": 512, "precision": "fp32", "fused": "true",
            "device": "auto", "teacher": "smollm2", "work": WORK, "profile": 0,
            "shapes": "false", "sides": "ours,naive", "chunk": 0}


def cpu_description() -> str:
    from megatron_minitron.runtime.device import CPU_BF16_FLAGS, cpuinfo_flags

    name = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = cpuinfo_flags() or frozenset()
    native = [f for f in CPU_BF16_FLAGS if f in flags]
    return f"{name}, bf16 flags: {', '.join(native) or 'none'}, threads {torch.get_num_threads()}"


class PeakMemory:
    """Peak extra memory of one call: CUDA's allocator counter, or the CPU process's RSS
    high-water mark reset through /proc/self/clear_refs (Linux)."""

    def __init__(self, device: torch.device):
        self.device = device

    def _rss(self, field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        return 0

    def measure(self, fn):
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            fn()
            torch.cuda.synchronize()
            return torch.cuda.max_memory_allocated() - base
        # glibc keeps freed memory mapped for reuse (runtime/allocator.py, set for every
        # minitron process and so for the naive loop in this one): give it back first, so the
        # high-water mark counts what the step itself touches
        release_freed_memory()
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass
        base = self._rss("VmRSS")
        fn()
        return self._rss("VmHWM") - base


def ours(k, teacher_ckpt: str, student_ckpt: str, overrides=()):
    """(trainer, device) of minitron distill's step on our checkpoints; `overrides`: more
    Hydra overrides, applied last."""
    from megatron_minitron.checkpoint import dist as ckpt
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.distill.kd_step import KDStep
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import initialize
    from megatron_minitron.training.loop import Trainer
    from megatron_minitron.training.metrics import MetricsWriter
    from megatron_minitron.training.optimizer import (attach_schedule_hooks, build_optimizer,
                                                      wrap_ddp)

    student_model = ckpt.read_header(student_ckpt).model
    teacher_model = ckpt.read_header(teacher_ckpt).model
    cfg = load_config([f"data.seq_length={k['seq']}", f"train.micro_batch_size={k['mbs']}",
                       f"train.global_batch_size={k['mbs']}", f"runtime.precision={k['precision']}",
                       f"runtime.device={k['device']}", "logger.backend=none", "train.train_iters=1000",
                       "train.optimizer.lr=3e-4", "train.optimizer.lr_warmup_iters=0",
                       f"distill.fused_output={k['fused']}", *overrides] +
                      ([f"distill.token_chunk_size={k['chunk']}"] if k.get("chunk") else []))
    import dataclasses

    cfg = dataclasses.replace(cfg, model=student_model)
    ctx = initialize(cfg.parallel, cfg.runtime)
    teacher = build_model(teacher_model, cfg.parallel, cfg.runtime, ctx.device)
    ckpt.load(teacher_ckpt, teacher)
    teacher[0].eval().requires_grad_(False)
    raw = build_model(student_model, cfg.parallel, cfg.runtime, ctx.device)
    ckpt.load(student_ckpt, raw)
    step = KDStep(cfg.distill, teacher[0], raw[0], ctx.tp_group, student_model.vocab_size,
                  ctx.device)
    chunks = wrap_ddp(raw)
    opt, sched = build_optimizer(chunks, cfg.train.optimizer, cfg.train)
    attach_schedule_hooks(chunks, opt)
    trainer = Trainer(cfg, ctx, chunks, step, opt, sched, None,
                      MetricsWriter("/tmp", cfg.logger, False), lambda s: None)
    return trainer, ctx.device


def naive(k, teacher_hf: str, student_hf: str, device: torch.device, loss_kind: str = "kd",
          lr: float = 3e-4):
    """The afternoon transformers KD loop, one optimizer step per call. loss_kind="ce": the
    same loop with the student's own cross entropy on the next tokens instead of forward KL
    (the teacher is then not run). Returns step(tokens) -> loss; step.student is the model."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    dtype = torch.bfloat16 if k["precision"] == "bf16" else torch.float32
    teacher = AutoModelForCausalLM.from_pretrained(teacher_hf, dtype=dtype).to(device)
    teacher.eval().requires_grad_(False)
    student = AutoModelForCausalLM.from_pretrained(student_hf, dtype=dtype).to(device)
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=lr)

    def step(tokens):
        opt.zero_grad(set_to_none=True)
        if loss_kind == "ce":
            loss = student(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            return loss
        with torch.no_grad():
            t_logits = teacher(input_ids=tokens).logits
        s_logits = student(input_ids=tokens).logits
        v = s_logits.shape[-1]
        logq = F.log_softmax(s_logits.float().view(-1, v), dim=-1)
        logp = F.log_softmax(t_logits.float().view(-1, v), dim=-1)
        loss = F.kl_div(logq, logp, log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()
        return loss

    step.student, step.teacher = student, teacher
    return step


def main():
    k = parse_knobs(sys.argv[1:], DEFAULTS)
    from smollm2 import pruned_checkpoint, teacher_checkpoint

    from megatron_minitron.checkpoint.hf import mcore_to_hf
    from megatron_minitron.checkpoint.smollm2 import fetch_smollm2

    work = Path(k["work"])
    teacher_ckpt = teacher_checkpoint(str(work), k["teacher"])
    source = "activation" if k["teacher"] == "smollm2" else "magnitude"  # random: no data
    student_ckpt = pruned_checkpoint(str(work), source, teacher=k["teacher"])
    student_hf = work / f"hf_student_{Path(student_ckpt).name}"
    if not (student_hf / "config.json").exists():
        mcore_to_hf(student_ckpt, str(student_hf), dtype="float32")
    if k["teacher"] == "smollm2":
        teacher_hf = str(fetch_smollm2())
    else:
        teacher_hf = str(work / "hf_teacher_random")
        if not (Path(teacher_hf) / "config.json").exists():
            mcore_to_hf(teacher_ckpt, teacher_hf, dtype="float32")

    trainer, device = ours(k, teacher_ckpt, student_ckpt)
    naive_step = naive(k, teacher_hf, str(student_hf), device)
    mbs, seq = k["mbs"], k["seq"]
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 49152, (mbs, seq + 1), generator=g)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(mbs, seq),
             "position_ids": torch.arange(seq).expand(mbs, -1)}
    it = iter(lambda: batch, None)
    tokens_on_device = batch["tokens"].to(device)
    peak = PeakMemory(device)
    peaks = {"ours": [], "naive": []}
    cpu = {"ours": [], "naive": []}

    def run(name, fn):
        def timed():
            c = time.process_time()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            cpu[name].append(time.process_time() - c)
        return timed

    steps = {"ours": lambda: trainer.train_step(it),
             "naive": lambda: naive_step(tokens_on_device)}
    times = interleaved({name: run(name, fn) for name, fn in steps.items()}, k["rounds"],
                        clock=time.perf_counter)
    for name in cpu:  # the warm-up round is not timed
        cpu[name] = cpu[name][1:]
    for _ in range(2):  # memory in steps of their own, after the timed ones
        for name, fn in steps.items():
            peaks[name].append(peak.measure(fn))
    tokens = mbs * seq
    print(f"CPU: {cpu_description()}" if device.type == "cpu" else
          f"GPU: {torch.cuda.get_device_name()}")
    teacher_name = "SmolLM2-135M" if k["teacher"] == "smollm2" else \
        "SmolLM2-135M-shaped, random init"
    print(f"teacher {teacher_name}, student {Path(student_ckpt).name} "
          f"({trainer.cfg.model.num_layers} layers, hidden {trainer.cfg.model.hidden_size}, "
          f"ffn {trainer.cfg.model.ffn_hidden_size}), batch {mbs}x{seq} = {tokens} tokens/step, "
          f"{k['precision']}, fused output layer: {k['fused']}, {k['rounds']} rounds")
    median_tps = {}
    for name, ts in times.items():
        tps = sorted(tokens / t for t in ts)
        median_tps[name] = tps[len(tps) // 2]
        mem = sorted(peaks[name])[len(peaks[name]) // 2] / 2**20
        print(f"{name:>6}: {median_tps[name]:7.0f} tokens/s (range {tps[0]:.0f}-{tps[-1]:.0f})"
              f", peak extra memory per step {mem:.0f} MiB")
    if device.type == "cpu":
        # CPU time: steadier than wall time when other jobs share the cores
        print(f"CPU-time ratio ours / naive (naive CPU s / ours CPU s): "
              f"{ratio_summary(cpu['naive'], cpu['ours'])}")
        dtype = torch.bfloat16 if k["precision"] == "bf16" else torch.float32
        f = step_floor(naive_step.teacher, naive_step.student, mbs, seq, dtype)
        share = {name: tps * f["total"] / tokens for name, tps in median_tps.items()}
        print(f"matrix products alone (bench/matmul_floor.py, timed here at this step's "
              f"shapes in {k['precision']}): linear layers {f['linear']:.2f} s + attention {f['attention']:.2f} s "
              f"per step = at most {tokens / f['total']:.0f} tokens/s; ours at "
              f"{share['ours']:.0%} of it, naive at {share['naive']:.0%}; 1.5 x naive would "
              f"be {1.5 * share['naive']:.0%}")
    if k["profile"] > 0:
        for name in k["sides"].split(","):
            print(f"{name}: top operators by self CPU time (torch.profiler, 2 steps)")
            print(top_ops(steps[name], steps=2, rows=k["profile"],
                          shapes=k["shapes"] == "true"))
    print(f"tokens/s ratio ours / naive: {ratio_summary(times['naive'], times['ours'])}")


if __name__ == "__main__":
    main()
