"""Rotary position embedding, forward + backward, on query and key shapes of SmolLM2-135M
(4 x 512 tokens, 9 query heads and 3 key/value heads of 64): ours (models/rope.py, megatron's
fused-RoPE hook) against megatron-core's unfused `_apply_rotary_pos_emb_bshd` (what its local
layers run without Transformer-Engine) and transformers' Llama `apply_rotary_pos_emb` (the
naive loop's), interleaved round by round in one process.

    python bench/rope.py [--rounds 7] [--seq 512] [--mbs 4]
"""

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import interleaved, ratio_summary  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--mbs", type=int, default=4)
    args = ap.parse_args()
    from megatron.core.models.common.embeddings import rope_utils
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from megatron_minitron.models.rope import apply_rope

    s, b, d = args.seq, args.mbs, 64
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2).float() / d)
    f = torch.outer(torch.arange(s).float(), inv)
    freqs = torch.cat((f, f), -1)[:, None, None, :]  # megatron: [s, 1, 1, d]
    cos, sin = freqs.cos()[:, 0, 0][None].expand(b, -1, -1), freqs.sin()[:, 0, 0][None].expand(
        b, -1, -1)  # transformers: [b, s, d], computed once per forward by the model
    g = torch.Generator().manual_seed(0)
    q_sbhd, k_sbhd = torch.randn(s, b, 9, d, generator=g), torch.randn(s, b, 3, d, generator=g)
    q_bhsd, k_bhsd = (x.permute(1, 2, 0, 3).contiguous() for x in (q_sbhd, k_sbhd))

    def megatron_layout(fn):
        def step():
            q, k = (x.clone().requires_grad_(True) for x in (q_sbhd, k_sbhd))
            (fn(q, freqs) * 1.0).sum().backward(inputs=[q])
            (fn(k, freqs) * 1.0).sum().backward(inputs=[k])
        return step

    def hf():
        q, k = (x.clone().requires_grad_(True) for x in (q_bhsd, k_bhsd))
        qo, ko = apply_rotary_pos_emb(q, k, cos, sin)
        (qo.sum() + ko.sum()).backward()

    steps = {"ours": megatron_layout(apply_rope),
             "megatron": megatron_layout(rope_utils._apply_rotary_pos_emb_bshd), "hf": hf}
    for fn in steps.values():
        fn()
    times = interleaved({k: lambda fn=fn: [fn() for _ in range(5)] for k, fn in steps.items()},
                        args.rounds, clock=time.perf_counter)
    print(f"RoPE forward + backward of q [{s}, {b}, 9, {d}] and k [{s}, {b}, 3, {d}], fp32, "
          f"threads {torch.get_num_threads()}, {args.rounds} rounds of 5")
    for k, ts in times.items():
        print(f"{k:>9}: median {sorted(ts)[len(ts) // 2] / 5 * 1e3:.1f} ms")
    print(f"speed-up of ours over megatron (its time / ours): "
          f"{ratio_summary(times['megatron'], times['ours'])}")
    print(f"speed-up of ours over transformers (its time / ours): "
          f"{ratio_summary(times['hf'], times['ours'])}")


if __name__ == "__main__":
    main()
