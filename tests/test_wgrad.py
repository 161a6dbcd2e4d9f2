"""training/wgrad.py: weight gradients accumulated straight into megatron's main_grad give the
gradients of megatron's unfused path (fresh weight gradient + DDP's add), over two
micro-batches, with tied and untied output layers, in fp32 and bf16."""

import pytest
import torch

from distributed import run_distributed


def _main_grads(tied: bool, precision: str):
    from megatron.core.tensor_parallel import layers

    from megatron_minitron.config.loader import load_config
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import initialize, teardown
    from megatron_minitron.training.optimizer import wrap_ddp

    cfg = load_config(["model=tiny", f"model.share_embeddings_and_output_weights={tied}",
                       f"runtime.precision={precision}"])
    ctx = initialize(cfg.parallel, cfg.runtime)
    try:
        (model,) = wrap_ddp(build_model(cfg.model, cfg.parallel, cfg.runtime, ctx.device))
        linears = {n: m for n, m in model.named_modules()
                   if isinstance(m, (layers.ColumnParallelLinear, layers.RowParallelLinear))}
        fused = sorted(n for n, m in linears.items() if m.gradient_accumulation_fusion)
        g = torch.Generator().manual_seed(0)
        batches = [torch.randint(0, cfg.model.vocab_size, (2, 17), generator=g) for _ in range(2)]

        def grads():
            model.zero_grad_buffer()
            for ids in batches:  # two micro-batches accumulate into main_grad
                loss = model(ids[:, :-1], torch.arange(16).expand(2, -1), None,
                             labels=ids[:, 1:]).float().mean()
                loss.backward()
            return {n: p.main_grad.clone().numpy() for n, p in model.named_parameters()}

        with_fusion = grads()
        for m in linears.values():
            m.gradient_accumulation_fusion = False
        without = grads()
        return fused, sorted(linears), with_fusion, without
    finally:
        teardown()


@pytest.mark.parametrize("tied,precision", [(True, "fp32"), (False, "fp32"), (True, "bf16")])
def test_wgrad_fusion_gives_the_same_gradients(tied, precision):
    fused, all_linears, with_fusion, without = run_distributed(_main_grads, 1, tied,
                                                               precision)[0]
    # every decoder linear accumulates in place; the output layer never does
    assert fused == [n for n in all_linears if not n.endswith("output_layer")]
    assert len(fused) == 4 * 4  # tiny: 4 layers x (linear_qkv, linear_proj, fc1, fc2)
    assert with_fusion.keys() == without.keys()
    for name, ref in without.items():
        scale = abs(ref).max()
        assert scale > 0, name  # every parameter got a gradient
        # fp32: addmm_ sums in another order than mm + add_; bf16: the same bf16 GEMM added
        # to the fp32 main_grad either way
        rtol, atol = (1e-5, 1e-7) if precision == "fp32" else (0.0, 0.0)
        torch.testing.assert_close(torch.from_numpy(with_fusion[name]), torch.from_numpy(ref),
                                   rtol=rtol, atol=atol, msg=name)
