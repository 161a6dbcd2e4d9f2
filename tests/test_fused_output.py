"""The fused output-layer logit loss (distill/fused_output.py) against fp64 references built
from full logits: loss values and the gradients of the student's hidden states and output
weight, at TP=1 and TP=2, for every divergence, with temperature, CE, masks and padding."""

import pytest
import torch

from distributed import next_port, run_distributed
from megatron_minitron.config.distill import DistillConfig
from megatron_minitron.distill.fused_output import fused_logit_distillation_loss
from megatron_minitron.distill.losses import logit_distillation_loss
from test_distill_losses import reference
from precision import FP32

S, B, HS, HT, V = 7, 3, 12, 16, 40
KINDS = ["forward_kl", "reverse_kl", "jsd", "topk_kl"]


def make_inputs(seed=0, v=V, v_teacher=None):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(S, B, HS, generator=g, dtype=torch.float64)
    ws = torch.randn(v, HS, generator=g, dtype=torch.float64) * 0.5
    ht = torch.randn(S, B, HT, generator=g, dtype=torch.float64)
    wt = torch.randn(v_teacher or v, HT, generator=g, dtype=torch.float64) * 0.5
    mask = (torch.rand(B, S, generator=g) > 0.3).float()
    labels = torch.randint(0, v, (B, S), generator=g)
    return hs, ws, ht, wt, mask, labels


def reference_grads(hs, ws, ht, wt, cfg, mask, labels, real=None):
    """fp64 loss and (d hidden, d weight) through full logits and the plain-torch reference."""
    hs, ws = hs.double().clone().requires_grad_(), ws.double().clone().requires_grad_()
    student = hs @ ws.t()  # [s, b, h] x [h, v] -> [s, b, v]
    teacher = ht.double() @ wt.double().t()
    if real is not None:
        student, teacher = student[..., :real], teacher[..., :real]
    loss = reference(student, teacher, cfg, mask=mask, labels=labels, reduction="mean")
    loss.backward()
    return loss.detach(), hs.grad, ws.grad


def fused(hs, ws, ht, wt, cfg, mask, labels, real=None, dtype=torch.float32, group=None):
    hs = hs.to(dtype).clone().requires_grad_()
    ws = ws.to(dtype).clone().requires_grad_()
    out = fused_logit_distillation_loss(hs, ws, ht.to(dtype), wt.to(dtype), cfg, loss_mask=mask,
                                        labels=labels, real_vocab_size=real, tp_group=group,
                                        reduction="mean")
    out.loss.backward()
    return out, hs.grad, ws.grad


def close(a, b, tol):
    torch.testing.assert_close(a.double(), b.double(), atol=tol, rtol=tol)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature,ce", [(1.0, 0.0), (1.7, 0.3)])
def test_fused_matches_fp64_reference(kind, temperature, ce):
    hs, ws, ht, wt, mask, labels = make_inputs()
    cfg = DistillConfig(logit_loss=kind, temperature=temperature, ce_weight=ce, top_k=5,
                        token_chunk_size=4, scale_by_temperature_squared=temperature != 1.0)
    ref_loss, ref_dh, ref_dw = reference_grads(hs, ws, ht, wt, cfg, mask, labels)
    out, dh, dw = fused(hs, ws, ht, wt, cfg, mask, labels)
    close(out.loss, ref_loss, 1e-5)
    close(dh, ref_dh, 1e-5)
    close(dw, ref_dw, 1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_fused_equals_unfused_with_padding_and_other_teacher_padding(kind):
    """Real vocabulary 33 of 40 student rows and 48 teacher rows (TP=1 cuts both)."""
    hs, ws, ht, wt, mask, labels = make_inputs(seed=3, v_teacher=48)
    labels = labels.clamp(max=32)
    cfg = DistillConfig(logit_loss=kind, top_k=5, ce_weight=0.2)
    out, dh, dw = fused(hs, ws, ht, wt, cfg, mask, labels, real=33)
    hs2 = hs.float().clone().requires_grad_()
    ws2 = ws.float().clone().requires_grad_()
    unfused = logit_distillation_loss(hs2 @ ws2.t(), ht.float() @ wt.float().t(), cfg,
                                      loss_mask=mask, labels=labels, real_vocab_size=33,
                                      reduction="mean")
    unfused.loss.backward()
    close(out.loss, unfused.loss, 1e-5)
    close(out.ce, unfused.ce, 1e-5)
    close(dh, hs2.grad, 1e-5)
    close(dw, ws2.grad, 1e-5)
    assert torch.count_nonzero(dw[33:]) == 0  # padding rows get no gradient


def test_bf16_weights_get_a_bf16_gradient_accumulated_in_fp32():
    hs, ws, ht, wt, mask, labels = make_inputs(seed=5)
    cfg = DistillConfig(token_chunk_size=2)
    ref_loss, ref_dh, ref_dw = reference_grads(hs, ws, ht, wt, cfg, mask, labels)
    out, dh, dw = fused(hs, ws, ht, wt, cfg, mask, labels, dtype=torch.bfloat16)
    assert dh.dtype == dw.dtype == torch.bfloat16
    close(out.loss, ref_loss, 3e-2)
    close(dw, ref_dw, 3e-2)


def test_weight_gradient_goes_to_megatron_main_grad_when_present():
    """megatron DDP gives params an fp32 main_grad: the fused loss adds into it, scaled by the
    schedule's loss scale, and leaves .grad alone."""
    hs, ws, ht, wt, mask, labels = make_inputs(seed=6)
    cfg = DistillConfig()
    _, _, ref_dw = reference_grads(hs, ws, ht, wt, cfg, mask, labels)
    h = hs.float().clone().requires_grad_()
    w = ws.float().clone().requires_grad_()
    w.main_grad = torch.ones_like(w)  # an earlier contribution stays
    out = fused_logit_distillation_loss(h, w, ht.float(), wt.float(), cfg, loss_mask=mask,
                                        labels=labels, reduction="mean")
    (out.loss * 0.25).backward()
    assert w.grad is None
    close(w.main_grad, 1 + 0.25 * ref_dw, 1e-5)


def test_with_the_loss_scale_known_the_weight_gradient_goes_to_main_grad_in_forward():
    """The training step passes the scale megatron's schedule applies: main_grad is written
    chunk by chunk during forward (no weight-sized temporary); a wrong scale is refused."""
    hs, ws, ht, wt, mask, labels = make_inputs(seed=7)
    cfg = DistillConfig(token_chunk_size=5)
    _, ref_dh, ref_dw = reference_grads(hs, ws, ht, wt, cfg, mask, labels)
    h = hs.float().clone().requires_grad_()
    w = ws.float().clone().requires_grad_()
    w.main_grad = torch.ones_like(w)
    out = fused_logit_distillation_loss(h, w, ht.float(), wt.float(), cfg, loss_mask=mask,
                                        labels=labels, reduction="mean", grad_scale=0.25)
    close(w.main_grad, 1 + 0.25 * ref_dw, 1e-5)  # already there before backward
    (out.loss * 0.25).backward()
    assert w.grad is None
    close(w.main_grad, 1 + 0.25 * ref_dw, 1e-5)
    close(h.grad, 0.25 * ref_dh, 1e-5)
    out = fused_logit_distillation_loss(h, w, ht.float(), wt.float(), cfg, loss_mask=mask,
                                        labels=labels, reduction="mean", grad_scale=0.25)
    with pytest.raises(RuntimeError, match="loss scale"):
        (out.loss * 0.5).backward()


def test_no_gradient_work_under_no_grad():
    hs, ws, ht, wt, mask, labels = make_inputs(seed=8)
    cfg = DistillConfig()
    ref_loss, _, _ = reference_grads(hs, ws, ht, wt, cfg, mask, labels)
    w = ws.float().clone().requires_grad_()
    w.main_grad = torch.zeros_like(w)
    with torch.no_grad():
        out = fused_logit_distillation_loss(hs.float(), w, ht.float(), wt.float(), cfg,
                                            loss_mask=mask, labels=labels, reduction="mean",
                                            grad_scale=1.0)
    close(out.loss, ref_loss, 1e-5)
    assert torch.count_nonzero(w.main_grad) == 0


def test_second_backward_is_refused():
    hs, ws, ht, wt, mask, labels = make_inputs()
    h = hs.float().requires_grad_()
    out = fused_logit_distillation_loss(h, ws.float(), ht.float(), wt.float(), DistillConfig())
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        out.loss.backward()


TP2_CASES = [{"kind": k, "real": r, "temp": 1.7, "ce": 0.3} for k in KINDS for r in (None, 33)] \
    + [{"kind": "forward_kl", "real": r, "temp": 1.0, "ce": 0.0} for r in (None, 33)]


def _tp2_worker(cases):
    import torch.distributed as dist

    from megatron_minitron.runtime.distributed import init_process_group

    init_process_group(torch.device("cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        hs, ws, ht, wt, mask, labels = make_inputs(seed=11)
        cfg = DistillConfig(logit_loss=case["kind"], top_k=6, temperature=case["temp"],
                            ce_weight=case["ce"], token_chunk_size=4,
                            scale_by_temperature_squared=True)
        shard = slice(rank * V // world, (rank + 1) * V // world)  # [v, h] -> [v/tp, h]
        out, dh, dw = fused(hs, ws[shard], ht, wt[shard], cfg, mask, labels.clamp(max=32),
                            real=case["real"], group=dist.group.WORLD)
        # megatron's copy_to_tensor_model_parallel_region sums the hidden gradient over TP
        dist.all_reduce(dh, group=dist.group.WORLD)
        results.append((out.loss.detach(), dh, dw))
    return results


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_tp2_worker, 2, TP2_CASES)


@pytest.mark.parametrize("i", range(len(TP2_CASES)),
                         ids=[f"{c['kind']}-pad{c['real'] is not None}-t{c['temp']}"
                              for c in TP2_CASES])
def test_tp2_matches_fp64_reference(tp2_results, i):
    case = TP2_CASES[i]
    hs, ws, ht, wt, mask, labels = make_inputs(seed=11)
    cfg = DistillConfig(logit_loss=case["kind"], top_k=6, temperature=case["temp"],
                        ce_weight=case["ce"], scale_by_temperature_squared=True)
    ref_loss, ref_dh, ref_dw = reference_grads(hs, ws, ht, wt, cfg, mask, labels.clamp(max=32),
                                               real=case["real"])
    (loss0, dh0, dw0), (loss1, dh1, dw1) = tp2_results[0][i], tp2_results[1][i]
    close(loss0, ref_loss, 1e-5)
    close(loss1, ref_loss, 1e-5)
    close(dh0, ref_dh, 1e-5)
    close(dh1, ref_dh, 1e-5)
    close(torch.cat([dw0, dw1]), ref_dw, 1e-5)


# --- the training steps: fused against GPTModel's own output layer, through megatron's schedule

def _step_grads(kind: str, tp: int):
    """main_grad of every student parameter after one schedule step (2 micro-batches), fused
    and unfused, for the LM step or the KD step; numpy, to travel back by value."""
    from megatron.core import parallel_state as ps

    from megatron_minitron.config.loader import load_config
    from megatron_minitron.distill.kd_step import KDStep
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import initialize
    from megatron_minitron.training.lm_step import LMStep
    from megatron_minitron.training.loop import Trainer
    from megatron_minitron.training.metrics import MetricsWriter
    from megatron_minitron.training.optimizer import (attach_schedule_hooks, build_optimizer,
                                                      wrap_ddp)

    out = {}
    for fused in (True, False):
        next_port()
        cfg = load_config([f"parallel.tensor_model_parallel_size={tp}", "data.seq_length=16",
                           "train.micro_batch_size=2", "train.global_batch_size=4",
                           "logger.backend=none", "model.share_embeddings_and_output_weights=true",
                           FP32])
        ctx = initialize(cfg.parallel, cfg.runtime)
        torch.manual_seed(0)
        teacher = build_model(cfg.model, cfg.parallel, cfg.runtime, ctx.device)[0]
        teacher.eval().requires_grad_(False)
        torch.manual_seed(1)
        raw = build_model(cfg.model, cfg.parallel, cfg.runtime, ctx.device)
        if kind == "lm":
            step = LMStep(ctx.device, fused=fused, num_microbatches=2)
        else:
            dcfg = DistillConfig(fused_output=str(fused).lower(), ce_weight=0.5)
            step = KDStep(dcfg, teacher, raw[0], ctx.tp_group, cfg.model.vocab_size, ctx.device,
                          num_microbatches=2)
        chunks = wrap_ddp(raw)
        opt, sched = build_optimizer(chunks, cfg.train.optimizer, cfg.train)
        attach_schedule_hooks(chunks, opt)
        trainer = Trainer(cfg, ctx, chunks, step, opt, sched, None,
                          MetricsWriter("/tmp", cfg.logger, False), lambda s: None)
        g = torch.Generator().manual_seed(0)
        data = []
        for _ in range(2):
            ids = torch.randint(0, cfg.model.vocab_size, (2, 17), generator=g)
            mask = torch.ones(2, 16)
            mask[0, 10:] = 0
            data.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask,
                         "position_ids": torch.arange(16).expand(2, -1)})
        for c in chunks:
            c.zero_grad_buffer()
        reports = trainer._schedule(iter(data), False, 2)
        out[fused] = ({n: p.main_grad.numpy().copy() for n, p in chunks[0].named_parameters()},
                      [{k: v.numpy().copy() for k, v in r.items()} for r in reports])
        ps.destroy_model_parallel()
    return out


@pytest.mark.parametrize("kind", ["lm", "kd"])
@pytest.mark.parametrize("tp", [1, 2])
def test_fused_training_step_equals_unfused(kind, tp):
    for out in run_distributed(_step_grads, tp, kind, tp):
        (grads_f, reports_f), (grads_u, reports_u) = out[True], out[False]
        assert grads_f.keys() == grads_u.keys()
        for name in grads_u:
            assert abs(grads_u[name]).max() > 0, name
            torch.testing.assert_close(torch.from_numpy(grads_f[name]),
                                       torch.from_numpy(grads_u[name]), atol=1e-6, rtol=1e-4,
                                       msg=name)
        for rf, ru in zip(reports_f, reports_u):
            for k in ru:
                torch.testing.assert_close(torch.from_numpy(rf[k]), torch.from_numpy(ru[k]),
                                           atol=1e-5, rtol=1e-5)


def test_hidden_states_out_hands_the_blocks_a_contiguous_gradient():
    """GPTModel transposes the output layer's result to [b, s]; the fused losses' hidden states
    keep that layout in memory, and the gradient they hand back reaches the transformer blocks
    contiguous in megatron's [s, b] layout (a strided one made every linear layer's backward
    copy its gradient twice)."""
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.models.output_layer import hidden_states_out
    from tests_helpers_single import single_process

    with single_process(load_config(["data.seq_length=16", FP32])) as (cfg, ctx):
        torch.manual_seed(0)
        gpt = build_model(cfg.model, cfg.parallel, cfg.runtime, ctx.device)[0]
        ids = torch.randint(0, cfg.model.vocab_size, (3, 16),
                            generator=torch.Generator().manual_seed(1))
        pos = torch.arange(16).expand(3, -1)
        seen = []
        gpt.decoder.final_layernorm.register_full_backward_hook(
            lambda module, grad_in, grad_out: seen.append(grad_out[0]))
        with hidden_states_out(gpt):
            hidden = gpt(ids, pos, None)
        assert hidden.shape == (3, 16, cfg.model.hidden_size) and hidden.is_contiguous()
        with torch.no_grad():
            ref = gpt.decoder(gpt.embedding(ids, pos), None,
                              rotary_pos_emb=gpt.rotary_pos_emb(16)).transpose(0, 1)
        torch.testing.assert_close(hidden, ref)
        hidden.mul(torch.randn(hidden.shape)).sum().backward()
        assert len(seen) == 1 and seen[0].shape == (16, 3, cfg.model.hidden_size)
        assert seen[0].is_contiguous()
