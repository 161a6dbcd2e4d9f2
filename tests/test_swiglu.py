"""models/swiglu.py against megatron-core's SwiGLU (its unfused glu and its fused kernel):
values and gradients in fp64, strided input, and megatron's MLP dispatching to it inside a
GPTModel built by our builder."""

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_swiglu import bias_swiglu_impl as megatron_fused

from megatron_minitron.models import swiglu
from precision import FP32


def _unfused(x):  # megatron's MLP without activation fusion (glu_linear_offset 0)
    a, b = torch.chunk(x, 2, dim=-1)
    return F.silu(a) * (b + 0.0)


def _value_and_grad(fn, x, g):
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad


def test_matches_megatron_in_fp64_and_takes_strided_input():
    gen = torch.Generator().manual_seed(0)
    wide = torch.randn(6, 3, 2 * 10 + 4, dtype=torch.float64, generator=gen)
    for x in (wide[..., :20].contiguous(), wide[..., 2:22]):  # contiguous, and a strided view
        g = torch.randn(6, 3, 10, dtype=torch.float64, generator=gen)
        y, gx = _value_and_grad(swiglu.swiglu, x, g)
        for ref in (_unfused, lambda t: megatron_fused(t, None)):
            y_ref, gx_ref = _value_and_grad(ref, x, g)
            torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
        assert gx.is_contiguous()


def test_megatron_mlp_dispatches_to_it_in_our_models():
    from megatron.core.transformer import mlp

    from megatron_minitron.config.loader import load_config
    from megatron_minitron.models.builder import build_model
    from tests_helpers_single import single_process

    cfg = load_config(["data.seq_length=16", "runtime.attention_impl=sdpa", FP32])
    with single_process(cfg) as (cfg, ctx):
        torch.manual_seed(0)
        gpt = build_model(cfg.model, cfg.parallel, cfg.runtime, ctx.device)[0]
        assert gpt.config.bias_activation_fusion and mlp.bias_swiglu_impl is swiglu.swiglu_impl
        ids = torch.randint(0, cfg.model.vocab_size, (2, 16),
                            generator=torch.Generator().manual_seed(1))
        pos = torch.arange(16).expand(2, -1)
        calls = []
        real = swiglu._SwiGLU.apply
        results = []
        try:
            swiglu._SwiGLU.apply = lambda x: calls.append(1) or real(x)
            for variant in ("ours", "megatron fused", "megatron unfused"):
                if variant == "megatron fused":
                    swiglu.uninstall()
                if variant == "megatron unfused":
                    gpt.config.bias_activation_fusion = False
                gpt.zero_grad(set_to_none=True)
                loss = gpt(ids, pos, None, labels=ids).sum()
                loss.backward()
                results.append((loss.detach(), [p.grad.clone() for p in gpt.parameters()]))
        finally:
            swiglu._SwiGLU.apply = real
            swiglu.install()
            gpt.config.bias_activation_fusion = True
        assert len(calls) == cfg.model.num_layers  # one forward with ours, one call per layer
        (loss0, g0) = results[0]
        for loss, grads in results[1:]:
            torch.testing.assert_close(loss, loss0, rtol=1e-5, atol=1e-5)
            for a, b in zip(grads, g0):
                torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
