"""The loss over cached teacher targets (distill/cached_targets.py) against the online losses:
top-k with k = vocabulary equals the full forward KL, top-k equals the online topk_kl, the
sampled estimator's expectation is the cross entropy to the teacher, and TP=2 equals TP=1."""

import numpy as np
import pytest
import torch

from distributed import run_distributed
from megatron_minitron.config.distill import DistillConfig
from megatron_minitron.distill import cache_records as rec
from megatron_minitron.distill.cached_targets import SAMPLED, TOPK, CachedTargets
from megatron_minitron.distill.fused_output import fused_logit_distillation_loss

S, B, H, V = 5, 2, 8, 24


def inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    hs = torch.randn(B, S, H, generator=g)
    ws = torch.randn(V, H, generator=g) * 0.5
    ht = torch.randn(B, S, H, generator=g)
    wt = torch.randn(V, H, generator=g) * 0.5
    mask = (torch.rand(B, S, generator=g) > 0.2).float()
    labels = torch.randint(0, V, (B, S), generator=g)
    return hs, ws, ht, wt, mask, labels


def targets(teacher_logits, kind, k, temperature=1.0, seed=0):
    """CachedTargets of `[b, s, v]` teacher logits, through the writer's records (fp32)."""
    ids, values, extra = [], [], []
    for i, z in enumerate(teacher_logits):  # one sample at a time, as the writer
        logp = torch.log_softmax(z / temperature, dim=-1)
        if kind == TOPK:
            r = rec.topk_record(logp, k, np.dtype(np.float32))
            ids.append(r["topk_ids"]), values.append(r["topk_logp"]), extra.append(r["topk_tail"])
        else:
            r = rec.sampled_record(logp, k, rec.sample_generator(seed, 0, i),
                                   np.dtype(np.float32))
            c = r["sampled_counts"].astype(np.float32)
            ids.append(r["sampled_ids"]), values.append(c / c.sum(-1, keepdims=True))
            extra.append(r["entropy"])
    flat = lambda xs, dt: torch.from_numpy(np.stack(xs).astype(dt)).reshape(  # noqa: E731
        -1, *xs[0].shape[1:])
    b, s = teacher_logits.shape[:2]
    return CachedTargets(kind, flat(ids, np.int64), flat(values, np.float32),
                         flat(extra, np.float32), shape=(b, s))


def run(hs, ws, teacher, cfg, mask, labels, group=None, wt=None, real=None):
    hs, ws = hs.clone().requires_grad_(), ws.clone().requires_grad_()
    out = fused_logit_distillation_loss(hs, ws, teacher, wt, cfg, loss_mask=mask,
                                        labels=labels, tp_group=group, reduction="mean",
                                        batch_first=True, real_vocab_size=real)
    out.loss.backward()
    return out.loss.detach(), out.kd, hs.grad, ws.grad


@pytest.mark.parametrize("temperature,ce", [(1.0, 0.0), (2.0, 0.5)])
def test_topk_with_k_equal_vocab_is_the_full_forward_kl(temperature, ce):
    hs, ws, ht, wt, mask, labels = inputs()
    cfg = DistillConfig(temperature=temperature, ce_weight=ce, token_chunk_size=3)
    cached = targets(ht @ wt.t(), TOPK, V, temperature)
    got = run(hs, ws, cached, cfg, mask, labels)
    want = run(hs, ws, ht, cfg, mask, labels, wt=wt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)


def test_cached_topk_equals_the_online_topk_kl():
    hs, ws, ht, wt, mask, labels = inputs(1)
    cfg = DistillConfig(logit_loss="topk_kl", top_k=5, token_chunk_size=4)
    got = run(hs, ws, targets(ht @ wt.t(), TOPK, 5), cfg, mask, labels)
    want = run(hs, ws, ht, cfg, mask, labels, wt=wt)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=2e-5)


def test_sampled_estimate_is_unbiased_for_the_cross_entropy_to_the_teacher():
    """Many independent k-draw records of one token: the mean loss is the cross entropy to
    the teacher H(p) + KL(p||q) (reported minus H(p): the KL) and the mean gradient q - p."""
    g = torch.Generator().manual_seed(3)
    v, k, n = 6, 4, 4000
    t, s = torch.randn(1, 1, v, generator=g) * 1.5, torch.randn(v, generator=g)
    logp, logq = torch.log_softmax(t[0, 0], -1), torch.log_softmax(s, -1)
    kl = float((logp.exp() * (logp - logq)).sum())
    losses, grads = [], []
    for i in range(n):
        c = targets(t, SAMPLED, k, seed=i)
        loss, grad = c.divergence(s.unsqueeze(0).clone(), 0, None)
        losses.append(float(loss)), grads.append(grad[0])
    mean = np.mean(losses)
    stderr = np.std(losses) / np.sqrt(n)
    assert abs(mean - kl) < 4 * stderr, (mean, kl, stderr)
    torch.testing.assert_close(torch.stack(grads).mean(0), logq.exp() - logp.exp(),
                               atol=0.02, rtol=0)
    # a biased estimator would fail: top-1 "sampling" (the argmax) misses the KL
    assert abs(float(-logq[logp.argmax()]) - float(-(logp.exp() * logq).sum())) > 4 * stderr


def test_sampled_records_count_each_draw_once():
    logp = torch.log_softmax(torch.randn(7, 10), -1)
    r = rec.sampled_record(logp, 9, rec.sample_generator(1, 0, 5), np.dtype(np.float16))
    counts = r["sampled_counts"].astype(int)
    assert (counts.sum(-1) == 9).all()
    for ids, c in zip(r["sampled_ids"], counts):
        real = ids[c > 0]
        assert len(set(real.tolist())) == len(real)  # distinct
        assert (c[:len(real)] > 0).all() and (c[len(real):] == 0).all()  # distinct first
    again = rec.sampled_record(logp, 9, rec.sample_generator(1, 0, 5), np.dtype(np.float16))
    assert (again["sampled_ids"] == r["sampled_ids"]).all()  # same key, same draws


def _tp_worker(kind):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    hs, ws, ht, wt, mask, labels = inputs(2)
    cfg = DistillConfig(temperature=1.5, ce_weight=0.3, token_chunk_size=4)
    cached = targets(ht @ wt.t(), kind, 7, 1.5)
    shard = V // 2
    loss, kd, gh, gw = run(hs, ws[rank * shard:(rank + 1) * shard], cached, cfg, mask, labels,
                           group=dist.group.WORLD)
    return loss, kd, gh, gw


@pytest.mark.parametrize("kind", [TOPK, SAMPLED])
def test_cached_loss_at_tp2_equals_tp1(kind):
    hs, ws, ht, wt, mask, labels = inputs(2)
    cfg = DistillConfig(temperature=1.5, ce_weight=0.3, token_chunk_size=4)
    loss, kd, gh, gw = run(hs, ws, targets(ht @ wt.t(), kind, 7, 1.5), cfg, mask, labels)
    r0, r1 = run_distributed(_tp_worker, 2, kind)
    for r in (r0, r1):
        torch.testing.assert_close(r[0], loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(r[1], kd, atol=1e-6, rtol=1e-6)
        # the hidden-state gradient of each rank is its vocabulary slice's share
    torch.testing.assert_close(r0[2] + r1[2], gh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(torch.cat([r0[3], r1[3]]), gw, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("overrides,field", [
    (["cache.mode=all"], "cache.mode"),
    (["cache.k=300"], "cache.k"),
    (["cache.temperature=0"], "cache.temperature"),
    (["cache.logprob_dtype=int8"], "cache.logprob_dtype"),
    (["distill.teacher_cache=/x", "distill.logit_loss=jsd"], "distill.teacher_cache"),
    (["distill.teacher_cache=/x", "distill.logit_loss=topk_kl"], "distill.teacher_cache"),
    (["distill.teacher_cache=/x", "distill.hidden_loss=mse", "distill.layer_pairs=[[1,1]]"],
     "distill.teacher_cache"),
    (["distill.teacher_cache=/x", "distill.fused_output=false"], "distill.teacher_cache"),
    (["distill.teacher_cache_estimator=full"], "distill.teacher_cache_estimator"),
    (["distill.teacher_cache=/x", "distill.teacher_precision=bf16"],
     "distill.teacher_precision"),
])
def test_bad_cache_settings_name_the_field(overrides, field):
    from megatron_minitron.config.errors import ConfigError
    from megatron_minitron.config.loader import load_config

    with pytest.raises(ConfigError, match=field.replace(".", r"\.")):
        load_config(overrides)
