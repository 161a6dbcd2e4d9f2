"""SDPA forward + backward on megatron's layouts: the value as megatron hands it (a slice of the
fused QKV projection `[s, b, ng, (np/ng + 2) hn]`, permuted to `[b, ng, s, hn]`: strided) against
the same value made contiguous first (the copy timed too), as models/attention.py does. Query
and key are contiguous `[b, np, s, hn]` in both, as our RoPE writes them. Interleaved rounds.

    python bench/attention_layout.py [--rounds 15] [--seq 512] [--mbs 4] [--heads 9]
                                     [--groups 3] [--head-dim 64]      # SmolLM2's shapes
"""

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from stats import interleaved, ratio_summary  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--mbs", type=int, default=4)
    ap.add_argument("--heads", type=int, default=9)
    ap.add_argument("--groups", type=int, default=3)
    ap.add_argument("--head-dim", type=int, default=64)
    a = ap.parse_args()
    s, b, h, g, d = a.seq, a.mbs, a.heads, a.groups, a.head_dim
    torch.manual_seed(0)
    mixed = torch.randn(s, b, g, (h // g + 2) * d)
    query, key, value = torch.split(mixed, [h // g * d, d, d], dim=3)
    q0 = query.reshape(s, b, h, d).permute(1, 2, 0, 3).contiguous()
    k0 = key.permute(1, 2, 0, 3).contiguous()
    v_leaf = value.detach().requires_grad_()  # [s, b, ng, hn], strided like megatron's

    def step(contiguous: bool):
        def run():
            q, k = q0.detach().requires_grad_(), k0.detach().requires_grad_()
            v = v_leaf.permute(1, 2, 0, 3)
            if contiguous:
                v = v.contiguous()
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=h != g)
            out.backward(torch.ones_like(out))
        return run

    times = interleaved({"strided": step(False), "contiguous": step(True)}, a.rounds)
    print(f"SDPA forward + backward, [b={b}, heads={h}, groups={g}, s={s}, d={d}], fp32, "
          f"threads {torch.get_num_threads()}")
    for name, ts in times.items():
        print(f"{name:>11}: median {sorted(ts)[len(ts) // 2] * 1e3:.1f} ms")
    print(f"speed contiguous / strided value: {ratio_summary(times['strided'], times['contiguous'])}")


if __name__ == "__main__":
    main()
