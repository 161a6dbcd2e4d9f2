"""Tokens/s of one training step of a ~10M-parameter Llama-shaped model: megatron_minitron's
megatron-core GPTModel (CPU compat layer, gloo, local spec) next to Hugging Face transformers'
LlamaForCausalLM of the same shape, in the same process, interleaved round by round.

    python bench/train_step.py [--rounds 8] [--precision fp32|bf16] [--seq 256] [--mbs 4]
                               [--loop-adam] [--profile N]
"""

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from op_profile import top_ops  # noqa: E402
from stats import interleaved, ratio_summary  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--loop-adam", action="store_true",
                    help="also time our step with megatron's AdamW as it comes (per-parameter "
                    "loop on CPU), to show what the fused kernel (the default) buys")
    ap.add_argument("--profile", type=int, default=0, metavar="N",
                    help="then each side's top N operators over 5 profiled steps")
    args = ap.parse_args()

    from transformers import LlamaConfig, LlamaForCausalLM

    from megatron_minitron.config.loader import load_config
    from megatron_minitron.runtime.distributed import initialize
    from megatron_minitron.training.lm_step import LMStep
    from megatron_minitron.training.loop import Trainer
    from megatron_minitron.training.metrics import MetricsWriter
    from megatron_minitron.training.optimizer import (attach_schedule_hooks, build_optimizer,
                                                      wrap_ddp)
    from megatron_minitron.models.builder import build_model

    cfg = load_config(["model=llama_10m", f"data.seq_length={args.seq}",
                       f"train.micro_batch_size={args.mbs}", f"train.global_batch_size={args.mbs}",
                       f"runtime.precision={args.precision}", "logger.backend=none"])
    ctx = initialize(cfg.parallel, cfg.runtime)
    m = cfg.model
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, m.vocab_size, (args.mbs, args.seq + 1), generator=g)
    batch = {"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(args.mbs, args.seq),
             "position_ids": torch.arange(args.seq).expand(args.mbs, -1)}

    class Repeat:
        def train_iterator(self, consumed):
            while True:
                yield batch

    def make_trainer(fused_adam: bool):
        chunks = wrap_ddp(build_model(m, cfg.parallel, cfg.runtime, ctx.device))
        opt, sched = build_optimizer(chunks, cfg.train.optimizer, cfg.train)
        if not fused_adam:  # megatron's torch AdamW as it comes: the per-parameter loop
            for group in opt.optimizer.param_groups:
                group["fused"], group["foreach"] = None, None
        attach_schedule_hooks(chunks, opt)
        step = LMStep(ctx.device, fused=cfg.train.fused_lm_loss, num_microbatches=1)
        return Trainer(cfg, ctx, chunks, step, opt, sched, Repeat(),
                       MetricsWriter("/tmp", cfg.logger, False), lambda s: None)

    trainer = make_trainer(True)
    it = Repeat().train_iterator(0)
    variants = {"minitron": lambda: trainer.train_step(it)}
    if args.loop_adam:
        loop_trainer = make_trainer(False)
        variants["minitron, loop AdamW"] = lambda: loop_trainer.train_step(it)

    hf = LlamaForCausalLM(LlamaConfig(
        vocab_size=m.padded_vocab_size, hidden_size=m.hidden_size,
        intermediate_size=m.ffn_hidden_size, num_hidden_layers=m.num_layers,
        num_attention_heads=m.num_attention_heads, num_key_value_heads=m.num_query_groups,
        head_dim=m.kv_channels, max_position_embeddings=m.max_position_embeddings,
        rope_theta=m.rotary_base, tie_word_embeddings=m.share_embeddings_and_output_weights,
        attn_implementation="sdpa"))
    hf_opt = torch.optim.AdamW(hf.parameters(), lr=3e-4, weight_decay=0.01, betas=(0.9, 0.95))

    def hf_step():
        hf_opt.zero_grad(set_to_none=True)
        ctxm = (torch.autocast("cpu", dtype=torch.bfloat16) if args.precision == "bf16"
                else torch.autocast("cpu", enabled=False))
        with ctxm:
            out = hf(input_ids=batch["tokens"], labels=batch["tokens"])
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        hf_opt.step()

    times = interleaved(dict(variants, hf=hf_step), args.rounds)
    tokens = args.mbs * args.seq
    nparams = sum(p.numel() for p in hf.parameters())
    print(f"model: {nparams / 1e6:.1f}M params, {m.num_layers} layers, hidden {m.hidden_size}, "
          f"batch {args.mbs}x{args.seq}, {args.precision}, threads {torch.get_num_threads()}")
    for k, ts in times.items():
        ts_sorted = sorted(ts)
        print(f"{k:>20}: {tokens / ts_sorted[len(ts) // 2]:9.0f} tokens/s (median step "
              f"{ts_sorted[len(ts) // 2] * 1e3:.1f} ms)")
    if args.loop_adam:
        print("tokens/s ratio fused AdamW / loop AdamW (ours): "
              f"{ratio_summary(times['minitron, loop AdamW'], times['minitron'])}")
    if args.profile > 0:
        for name, fn in (("minitron", variants["minitron"]), ("hf", hf_step)):
            print(f"{name}: top operators by self CPU time (torch.profiler, 5 steps)")
            print(top_ops(fn, steps=5, rows=args.profile))
    print(f"tokens/s ratio minitron / hf: {ratio_summary(times['hf'], times['minitron'])}")


if __name__ == "__main__":
    main()
