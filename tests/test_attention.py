"""runtime.attention_impl=sdpa (models/attention.py, models/rope.py) against megatron-core's
own DotProductAttention and unfused RoPE: same logits and gradients, at TP=1 and TP=2, with
grouped queries."""

import pytest
import torch

from distributed import next_port, run_distributed
from precision import FP32

MODEL = ["model.num_attention_heads=4", "model.num_query_groups=2", "data.seq_length=16"]


def _logits_and_grads(impl, tp):
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.models.builder import build_model, unwrap
    from megatron_minitron.runtime.distributed import initialize, teardown

    cfg = load_config(MODEL + [f"runtime.attention_impl={impl}",
                               f"parallel.tensor_model_parallel_size={tp}", FP32])
    ctx = initialize(cfg.parallel, cfg.runtime)
    try:
        gpt = build_model(cfg.model, cfg.parallel, cfg.runtime, ctx.device)[0]
        inner = unwrap(gpt)  # a Float16Module under bf16
        attn = (type(inner.decoder.layers[0].self_attention.core_attention).__name__,
                inner.config.apply_rope_fusion)
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, cfg.model.vocab_size, (2, 16), generator=g)
        logits = gpt(tokens, torch.arange(16).expand(2, -1), None)
        logits.float().pow(2).mean().backward()
        # numpy arrays travel back by value (tensors would be shared through files that the
        # worker's exit removes)
        grads = {n: p.grad.numpy().copy() for n, p in gpt.named_parameters()
                 if p.grad is not None}
        return attn, logits.detach().numpy().copy(), grads
    finally:
        teardown()


def _both(tp):
    """Two runs in one set of processes, each on its own rendezvous port."""
    out = []
    for impl in "megatron", "sdpa":
        next_port()
        out.append(_logits_and_grads(impl, tp))
    return out


@pytest.mark.parametrize("tp", [1, 2])
def test_sdpa_attention_matches_megatron_attention(tp):
    results = run_distributed(_both, tp, tp)
    for (attn_m, logits_m, grads_m), (attn_s, logits_s, grads_s) in results:
        assert (attn_m, attn_s) == (("DotProductAttention", False), ("SDPAttention", True))
        torch.testing.assert_close(torch.from_numpy(logits_s), torch.from_numpy(logits_m),
                                   atol=2e-5, rtol=1e-4)
        assert grads_s.keys() == grads_m.keys()
        for name in grads_m:
            torch.testing.assert_close(torch.from_numpy(grads_s[name]),
                                       torch.from_numpy(grads_m[name]), atol=2e-6, rtol=1e-3,
                                       msg=name)


def test_attention_impl_is_validated():
    from megatron_minitron.config.errors import ConfigError
    from megatron_minitron.config.parallel import RuntimeConfig

    with pytest.raises(ConfigError, match="runtime.attention_impl"):
        RuntimeConfig(attention_impl="flash")
