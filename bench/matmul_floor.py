"""The time a distillation step's matrix products alone take on this machine: a lower bound
on the step time of any implementation that does the same work in the same precision (the
naive loop, ours, any other), and so an upper bound on its tokens/s.

Linear layers (the output layer included): the teacher's forward products, the student's
forward and both backward products (input gradient, weight gradient); each distinct shape
timed on its own with torch.mm, in the step's precision (bf16 products with bf16 inputs and
outputs, as both sides' bf16 steps run them; fp32 otherwise). Attention: torch's causal scaled_dot_product_attention at the
step's batch, heads and sequence length, the teacher's forward and the student's forward +
backward, once per layer (both sides of the comparison run this kernel). Every figure is the
median of `repeats` calls after a warm-up. Left out, so the true floor is higher:
normalisation, activations, RoPE, the loss, the optimizer."""

import statistics
import time
from typing import Dict, Iterable, Tuple

import torch


def _linear_shapes(model: torch.nn.Module) -> Iterable[Tuple[int, int]]:
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            yield m.in_features, m.out_features


def _median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def matmul_seconds(teacher: torch.nn.Module, student: torch.nn.Module, tokens: int,
                   dtype: torch.dtype = torch.float32, repeats: int = 5) -> Dict[str, float]:
    """{"teacher": s, "student": s, "total": s}: one step's linear matmuls at `tokens` rows."""
    cache: Dict[Tuple, float] = {}

    def timed(kind: str, k: int, n: int) -> float:
        key = (kind, k, n)
        if key not in cache:
            if kind == "fwd":  # x [tokens, k] @ W^T [k, n]
                a, b = torch.randn(tokens, k, dtype=dtype), torch.randn(n, k, dtype=dtype).t()
            elif kind == "dgrad":  # dy [tokens, n] @ W [n, k]
                a, b = torch.randn(tokens, n, dtype=dtype), torch.randn(n, k, dtype=dtype)
            else:  # wgrad: dy^T [n, tokens] @ x [tokens, k]
                a, b = torch.randn(tokens, n, dtype=dtype).t(), torch.randn(tokens, k, dtype=dtype)
            cache[key] = _median_seconds(lambda: torch.mm(a, b), repeats)
        return cache[key]

    t = sum(timed("fwd", k, n) for k, n in _linear_shapes(teacher))
    s = sum(timed(kind, k, n) for k, n in _linear_shapes(student)
            for kind in ("fwd", "dgrad", "wgrad"))
    return {"teacher": t, "student": s, "total": t + s}


def attention_seconds(config, batch: int, seq: int, backward: bool,
                      dtype: torch.dtype = torch.float32, repeats: int = 5) -> float:
    """All layers' causal SDPA of a Hugging Face Llama-style `config` at [batch, heads, seq,
    head_dim]: forward, or forward + backward."""
    import torch.nn.functional as F

    heads = config.num_attention_heads
    dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    q, k, v = (torch.randn(batch, heads, seq, dim, dtype=dtype, requires_grad=backward)
               for _ in range(3))

    def call():
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        if backward:
            out.backward(torch.ones_like(out))
    with torch.set_grad_enabled(backward):
        return config.num_hidden_layers * _median_seconds(call, repeats)


def step_floor(teacher, student, batch: int, seq: int, dtype: torch.dtype = torch.float32
               ) -> Dict[str, float]:
    """{"linear": s, "attention": s, "total": s} for one KD step of Hugging Face models."""
    linear = matmul_seconds(teacher, student, batch * seq, dtype)["total"]
    attention = (attention_seconds(teacher.config, batch, seq, False, dtype) +
                 attention_seconds(student.config, batch, seq, True, dtype))
    return {"linear": linear, "attention": attention, "total": linear + attention}
