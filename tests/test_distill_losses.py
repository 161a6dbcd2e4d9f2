"""Distillation losses against float64 references, at TP=1 and on two gloo ranks (TP=2)."""

import math

import pytest
import torch
import torch.nn.functional as F

from distributed import run_distributed
from megatron_minitron.config.distill import DistillConfig
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.distill.balancing import combine
from megatron_minitron.distill.hidden import HiddenStateLoss
from megatron_minitron.distill.losses import logit_distillation_loss

KINDS = ("forward_kl", "reverse_kl", "jsd", "topk_kl")
S, B, V = 5, 3, 24  # small [s, b, v] logits


def make_logits(seed=0, s=S, b=B, v=V, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(s, b, v, generator=g) * scale,
            torch.randn(s, b, v, generator=g) * scale)


def reference(student, teacher, cfg, mask=None, labels=None, real=None, reduction="mean"):
    """Float64, full vocabulary, plain autograd: the definitions the chunked code must match."""
    s, t = student.double(), teacher.double()
    if real is not None:
        s, t = s[..., :real], t[..., :real]
    temp = cfg.temperature
    logq, logp = F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1)
    q, p = logq.exp(), logp.exp()
    if cfg.logit_loss == "forward_kl":
        tok = (p * (logp - logq)).sum(-1)
    elif cfg.logit_loss == "reverse_kl":
        tok = (q * (logq - logp)).sum(-1)
    elif cfg.logit_loss == "jsd":
        beta = cfg.jsd_beta
        logm = (beta * p + (1 - beta) * q).log()
        tok = beta * (p * (logp - logm)).sum(-1) + (1 - beta) * (q * (logq - logm)).sum(-1)
    else:
        idx = t.topk(min(cfg.top_k, t.shape[-1]), dim=-1).indices
        pk, qk = p.gather(-1, idx), q.gather(-1, idx)
        pr, qr = 1 - pk.sum(-1), 1 - qk.sum(-1)
        bucket = torch.where(pr > 1e-12, pr * (pr.log() - qr.log()), torch.zeros_like(pr))
        tok = (pk * (pk.log() - qk.log())).sum(-1) + bucket
    if cfg.scale_by_temperature_squared:
        tok = tok * temp ** 2
    tok = cfg.kd_weight * tok
    if cfg.ce_weight > 0:
        ce = F.cross_entropy(s.reshape(-1, s.shape[-1]), labels.t().reshape(-1),
                             reduction="none")
        tok = tok + cfg.ce_weight * ce.view(tok.shape)
    m = torch.ones_like(tok) if mask is None else mask.t().double()
    total = (tok * m).sum()
    return total if reduction == "sum" else total / m.sum()


def ours_and_ref(student, teacher, cfg, tp_group=None, **kw):
    """(our loss, our grad, reference loss, reference grad)."""
    s1 = student.clone().requires_grad_()
    out = logit_distillation_loss(s1, teacher, cfg, tp_group=tp_group, **kw)
    out.loss.backward()
    s2 = student.double().requires_grad_()
    ref = reference(s2, teacher, cfg, mask=kw.get("loss_mask"), labels=kw.get("labels"),
                    real=kw.get("real_vocab_size"), reduction=kw.get("reduction", "sum"))
    ref.backward()
    return out.loss, s1.grad, ref, s2.grad


def assert_close(ours, grad, ref, ref_grad, atol=1e-5):
    torch.testing.assert_close(ours.double(), ref.detach(), atol=atol, rtol=1e-5)
    torch.testing.assert_close(grad.double(), ref_grad, atol=atol, rtol=1e-4)


def test_forward_kl_equals_torch_kl_div():
    s, t = make_logits()
    cfg = DistillConfig(token_chunk_size=4)
    s1 = s.clone().requires_grad_()
    ours = logit_distillation_loss(s1, t, cfg, reduction="mean")
    ours.loss.backward()
    s2 = s.double().requires_grad_()
    ref = F.kl_div(F.log_softmax(s2, -1), F.log_softmax(t.double(), -1), log_target=True,
                   reduction="none").sum(-1).mean()
    ref.backward()
    assert_close(ours.loss, s1.grad, ref, s2.grad)
    assert int(ours.num_tokens) == S * B


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("temperature,scaled", [(1.0, False), (2.0, False), (2.0, True)])
def test_loss_and_grad_match_float64_reference(kind, temperature, scaled):
    s, t = make_logits(seed=1)
    cfg = DistillConfig(logit_loss=kind, temperature=temperature, top_k=5, jsd_beta=0.3,
                        scale_by_temperature_squared=scaled, token_chunk_size=4)
    assert_close(*ours_and_ref(s, t, cfg, reduction="mean"))


@pytest.mark.parametrize("kind", KINDS)
def test_chunked_equals_unchunked(kind):
    s, t = make_logits(seed=2)
    results = []
    for chunk in (1, 4, 7, 10_000):
        cfg = DistillConfig(logit_loss=kind, token_chunk_size=chunk, top_k=4)
        loss, grad, _, _ = ours_and_ref(s, t, cfg)
        results.append((loss, grad))
    for loss, grad in results[1:]:
        torch.testing.assert_close(loss, results[0][0], atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, results[0][1], atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("kind", KINDS)
def test_student_equal_to_teacher_has_zero_loss_and_gradient(kind):
    s, _ = make_logits(seed=3)
    cfg = DistillConfig(logit_loss=kind, top_k=3, temperature=1.5, token_chunk_size=4)
    student = s.clone().requires_grad_()
    out = logit_distillation_loss(student, s.clone(), cfg)
    out.loss.backward()
    assert abs(out.loss.item()) < 1e-6
    assert student.grad.abs().max().item() < 1e-7


def test_temperature_squared_scaling():
    s, t = make_logits(seed=4)
    plain = DistillConfig(temperature=3.0)
    scaled = DistillConfig(temperature=3.0, scale_by_temperature_squared=True)
    l1, g1, _, _ = ours_and_ref(s, t, plain)
    l2, g2, _, _ = ours_and_ref(s, t, scaled)
    torch.testing.assert_close(l2, 9.0 * l1)
    torch.testing.assert_close(g2, 9.0 * g1)


@pytest.mark.parametrize("kind", KINDS)
def test_masked_tokens_are_ignored(kind):
    s, t = make_logits(seed=5)
    mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    mask[0, 0] = 0
    cfg = DistillConfig(logit_loss=kind, top_k=4, token_chunk_size=4)
    loss, grad, ref, ref_grad = ours_and_ref(s, t, cfg, loss_mask=mask, reduction="mean")
    assert_close(loss, grad, ref, ref_grad)
    masked = mask.t() == 0  # [s, b]
    assert grad[masked].abs().max().item() == 0.0
    s_changed = s.clone()
    s_changed[masked] = 100.0 * torch.randn_like(s_changed[masked])
    loss2, _, _, _ = ours_and_ref(s_changed, t, cfg, loss_mask=mask, reduction="mean")
    torch.testing.assert_close(loss2, loss)
    out = logit_distillation_loss(s, t, cfg, loss_mask=mask)
    assert int(out.num_tokens) == int(mask.sum())


@pytest.mark.parametrize("kind", KINDS)
def test_padded_vocabulary_columns_are_ignored(kind):
    s, t = make_logits(seed=6)
    real = V - 5
    garbage = torch.randn(S, B, 5) * 50
    cfg = DistillConfig(logit_loss=kind, top_k=4, token_chunk_size=4)
    s_pad, t_pad = s.clone(), t.clone()
    s_pad[..., real:], t_pad[..., real:] = garbage, -garbage
    loss, grad, _, _ = ours_and_ref(s_pad, t_pad, cfg, real_vocab_size=real)
    ref_loss, ref_grad, _, _ = ours_and_ref(s[..., :real], t[..., :real], cfg)
    torch.testing.assert_close(loss, ref_loss)
    torch.testing.assert_close(grad[..., :real], ref_grad)
    assert grad[..., real:].abs().max().item() == 0.0
    # TP=1 with a teacher padded differently: both are cut to the real vocabulary
    t_wider = torch.cat([t[..., :real], torch.randn(S, B, 9)], dim=-1)
    loss3, grad3, _, _ = ours_and_ref(s_pad, t_wider, cfg, real_vocab_size=real)
    torch.testing.assert_close(loss3, ref_loss)
    assert grad3[..., real:].abs().max().item() == 0.0


def test_topk_kl_definition():
    s, t = make_logits(seed=7, v=40)
    cfg = DistillConfig(logit_loss="topk_kl", top_k=6, token_chunk_size=4)
    assert_close(*ours_and_ref(s, t, cfg))
    # k covering the whole vocabulary leaves an empty bucket: plain forward KL
    full_k = DistillConfig(logit_loss="topk_kl", top_k=64)
    fkl = DistillConfig(logit_loss="forward_kl")
    l1, g1, _, _ = ours_and_ref(s, t, full_k)
    l2, g2, _, _ = ours_and_ref(s, t, fkl)
    torch.testing.assert_close(l1, l2)
    torch.testing.assert_close(g1, g2)


def test_cross_entropy_term():
    s, t = make_logits(seed=8)
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(1))
    cfg = DistillConfig(ce_weight=0.5, kd_weight=2.0, temperature=2.0, token_chunk_size=4)
    assert_close(*ours_and_ref(s, t, cfg, labels=labels))
    s1 = s.clone().requires_grad_()
    out = logit_distillation_loss(s1, t, DistillConfig(ce_weight=1.0, kd_weight=0.0),
                                  labels=labels, reduction="mean")
    ref = F.cross_entropy(s.reshape(-1, V), labels.t().reshape(-1))
    torch.testing.assert_close(out.loss, ref)
    torch.testing.assert_close(out.ce, ref)


def test_batch_first_logits_from_gpt_model_forward():
    s, t = make_logits(seed=14)
    mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(4)) > 0.3).float()
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(5))
    cfg = DistillConfig(ce_weight=0.3, token_chunk_size=4)
    seq_first = s.clone().requires_grad_()
    batch_first = s.transpose(0, 1).contiguous().requires_grad_()  # [s, b, v] -> [b, s, v]
    a = logit_distillation_loss(seq_first, t, cfg, loss_mask=mask, labels=labels)
    b = logit_distillation_loss(batch_first, t.transpose(0, 1).contiguous(), cfg,
                                loss_mask=mask, labels=labels, batch_first=True)
    (a.loss + b.loss).backward()
    torch.testing.assert_close(a.loss, b.loss)
    torch.testing.assert_close(seq_first.grad, batch_first.grad.transpose(0, 1))


def test_bf16_logits_keep_their_dtype():
    s, t = make_logits(seed=9)
    s16 = s.bfloat16().requires_grad_()
    out = logit_distillation_loss(s16, t.bfloat16(), DistillConfig(token_chunk_size=4))
    out.loss.backward()
    assert out.loss.dtype == torch.float32 and s16.grad.dtype == torch.bfloat16
    ref = reference(s.bfloat16().double(), t.bfloat16().double(), DistillConfig(),
                    reduction="sum")
    torch.testing.assert_close(out.loss.double(), ref, atol=1e-4, rtol=1e-5)


def test_second_backward_is_refused():
    s, t = make_logits()
    s1 = s.clone().requires_grad_()
    loss = logit_distillation_loss(s1, t, DistillConfig()).loss
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        loss.backward()


# --- TP=2 on two gloo ranks: shard the same logits by vocabulary -------------------------------

TP2_CASES = [
    dict(kind=k, real=None, mask=False, ce=0.0) for k in KINDS
] + [
    dict(kind=k, real=V - 7, mask=True, ce=0.5) for k in KINDS  # padding in rank 1's shard
] + [
    dict(kind="forward_kl", real=V - 7, mask=True, ce=0.0, temp=1.0)  # CE from the KD's pass
]


def _tp2_case_inputs(case):
    s, t = make_logits(seed=11)
    mask = (torch.rand(B, S, generator=torch.Generator().manual_seed(2)) > 0.3).float() \
        if case["mask"] else None
    labels = torch.randint(0, case["real"] or V, (B, S),
                           generator=torch.Generator().manual_seed(3))
    # top_k 6 > the 5 real columns of rank 1 when padded: its candidates are padded with -inf
    cfg = DistillConfig(logit_loss=case["kind"], top_k=6, temperature=case.get("temp", 1.7),
                        token_chunk_size=4,
                        ce_weight=case["ce"], scale_by_temperature_squared=True)
    return s, t, mask, labels, cfg


def _tp2_worker(cases):
    import torch.distributed as dist

    from megatron_minitron.runtime.distributed import init_process_group

    init_process_group(torch.device("cpu"))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = []
    for case in cases:
        s, t, mask, labels, cfg = _tp2_case_inputs(case)
        shard = slice(rank * V // world, (rank + 1) * V // world)  # [s, b, v] -> [s, b, v/tp]
        s_local = s[..., shard].clone().requires_grad_()
        out = logit_distillation_loss(s_local, t[..., shard], cfg, loss_mask=mask,
                                      labels=labels, real_vocab_size=case["real"],
                                      tp_group=dist.group.WORLD, reduction="mean")
        out.loss.backward()
        results.append((out.loss.detach(), s_local.grad, out.ce))
    return results


@pytest.fixture(scope="module")
def tp2_results():
    return run_distributed(_tp2_worker, 2, TP2_CASES)


@pytest.mark.parametrize("i", range(len(TP2_CASES)),
                         ids=[f"{c['kind']}-pad{c['real'] is not None}" for c in TP2_CASES])
def test_tp2_matches_reference(tp2_results, i):
    s, t, mask, labels, cfg = _tp2_case_inputs(TP2_CASES[i])
    s2 = s.double().requires_grad_()
    ref = reference(s2, t, cfg, mask=mask, labels=labels, real=TP2_CASES[i]["real"])
    ref.backward()
    (loss0, grad0, ce0), (loss1, grad1, ce1) = tp2_results[0][i], tp2_results[1][i]
    torch.testing.assert_close(loss0, loss1)  # every TP rank sees the same loss
    assert_close(loss0, torch.cat([grad0, grad1], dim=-1), ref, s2.grad)
    real = TP2_CASES[i]["real"] or V  # the logged CE: over the real vocabulary, masked mean
    per_token = F.cross_entropy(s[..., :real].double().reshape(-1, real),
                                labels.t().reshape(-1), reduction="none")
    m = torch.ones(S * B, dtype=torch.float64) if mask is None else mask.t().reshape(-1).double()
    torch.testing.assert_close(ce0.double(), (per_token * m).sum() / m.sum())
    torch.testing.assert_close(ce0, ce1)


# --- hidden states, balancing, config ----------------------------------------------------------

def test_hidden_state_losses_and_projection_gradients():
    g = torch.Generator().manual_seed(12)
    student = {0: torch.randn(S, B, 8, generator=g), 2: torch.randn(S, B, 8, generator=g)}
    teacher = {0: torch.randn(S, B, 12, generator=g), 3: torch.randn(S, B, 12, generator=g)}
    mask = torch.ones(B, S)
    mask[1, 2:] = 0
    for kind in ("cosine", "mse"):
        cfg = DistillConfig(hidden_loss=kind, layer_pairs=[[3, 2]], embedding_loss=True)
        module = HiddenStateLoss(cfg, student_hidden_size=8, teacher_hidden_size=12)
        assert sorted(module.state_dict()) == ["projections.embedding.weight",
                                               "projections.hidden_2.weight"]
        assert module.student_layers == [0, 2] and module.teacher_layers == [0, 3]
        states = {k: v.clone().requires_grad_() for k, v in student.items()}
        terms = module(states, teacher, loss_mask=mask, reduction="mean")
        w = module.projections["hidden_2"].weight
        proj = states[2] @ w.t()  # [s, b, 8] -> [s, b, 12]
        if kind == "cosine":
            tok = 1 - F.cosine_similarity(proj, teacher[3], dim=-1)
        else:
            tok = (proj - teacher[3]).pow(2).mean(-1)
        expected = (tok * mask.t()).sum() / mask.sum()
        torch.testing.assert_close(terms["hidden_2"], expected)
        (terms["hidden_2"] + terms["embedding"]).backward()
        assert w.grad is not None and w.grad.abs().sum() > 0
        assert states[2].grad[2:, 1].abs().max() == 0  # masked tokens get no gradient
    same = HiddenStateLoss(DistillConfig(hidden_loss="mse", layer_pairs=[[1, 1]]), 8, 8)
    assert len(list(same.parameters())) == 0
    x = torch.randn(S, B, 8)
    assert same({1: x}, {1: x})["hidden_1"].item() == 0.0


def test_auto_balancing_matches_logit_magnitude_with_detached_ratio():
    s, t = make_logits(seed=13)
    cfg = DistillConfig(hidden_loss="mse", layer_pairs=[[1, 1]], balancing="auto")
    logit = logit_distillation_loss(s.clone().requires_grad_(), t, cfg)
    h = torch.tensor(7.0, requires_grad=True)
    out = combine(logit, {"hidden_1": h * 2.0}, cfg)
    torch.testing.assert_close(out["hidden_1"], logit.kd)
    torch.testing.assert_close(out["total"], 2.0 * logit.kd)
    out["total"].backward()
    torch.testing.assert_close(h.grad, 2.0 * logit.kd / 14.0)  # the ratio is a constant
    fixed = DistillConfig(hidden_loss="mse", layer_pairs=[[1, 1]], embedding_loss=True,
                          balancing="fixed", hidden_weight=0.5, embedding_weight=3.0)
    out = combine(logit, {"hidden_1": torch.tensor(2.0), "embedding": torch.tensor(1.0)}, fixed)
    torch.testing.assert_close(out["total"], logit.loss + 1.0 + 3.0)
    assert set(out) == {"kd", "hidden_1", "embedding", "total"}


@pytest.mark.parametrize("kwargs,field", [
    (dict(logit_loss="kl"), "distill.logit_loss"),
    (dict(temperature=0.0), "distill.temperature"),
    (dict(jsd_beta=1.0), "distill.jsd_beta"),
    (dict(top_k=0), "distill.top_k"),
    (dict(token_chunk_size=0), "distill.token_chunk_size"),
    (dict(layer_pairs=[[2, 1]]), "distill.hidden_loss"),
    (dict(hidden_loss="mse", layer_pairs=[[2]]), "distill.layer_pairs"),
    (dict(kd_weight=0.0), "distill.kd_weight"),
    (dict(balancing="magic"), "distill.balancing"),
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ConfigError) as e:
        DistillConfig(**kwargs)
    assert e.value.field == field


def test_bad_shapes_are_explained():
    s, t = make_logits()
    with pytest.raises(ValueError, match="same padded vocabulary"):
        logit_distillation_loss(s, t[..., :-2], DistillConfig())
    with pytest.raises(ValueError, match=r"\[b, s\]"):
        logit_distillation_loss(s, t, DistillConfig(), loss_mask=torch.ones(S, B + 1))
    assert math.isfinite(logit_distillation_loss(s, t, DistillConfig()).loss.item())


@pytest.mark.parametrize("kind,temperature", [("forward_kl", 1.0), ("forward_kl", 2.0),
                                               ("reverse_kl", 1.0)])
def test_logged_cross_entropy_comes_free_with_the_kd_loss(kind, temperature):
    """ce_weight=0 with labels: the student's CE is reported from the same chunked pass (forward
    KL at T=1: read from the divergence's own log-softmax; otherwise a logsumexp of its own),
    and it neither enters the loss nor its gradient."""
    s, t = make_logits(seed=21)
    labels = torch.randint(0, V, (B, S), generator=torch.Generator().manual_seed(2))
    s1, s2 = s.clone().requires_grad_(), s.clone().requires_grad_()
    cfg = DistillConfig(logit_loss=kind, temperature=temperature, token_chunk_size=3)
    logged = logit_distillation_loss(s1, t, cfg, labels=labels, reduction="mean")
    plain = logit_distillation_loss(s2, t, cfg, reduction="mean")
    torch.testing.assert_close(logged.ce, F.cross_entropy(s.reshape(-1, V), labels.t().reshape(-1)))
    assert plain.ce is None
    torch.testing.assert_close(logged.loss, plain.loss)
    logged.loss.backward()
    plain.loss.backward()
    torch.testing.assert_close(s1.grad, s2.grad)
    assert torch.equal(s1.detach(), s) and torch.equal(s2.detach(), s)  # logits only read
