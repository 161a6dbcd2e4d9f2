"""How far the cached estimators are from online forward KL, at one point of training: the
SmolLM2 teacher and its pruned student (the bench fixture) on held-out text. For each token
batch, the exact forward KL(p || q) and its gradient with respect to the student's logits are
compared with those of the top-k + tail-bucket loss for k in {8, 32, 128} (deterministic: its
difference is a bias) and of the sampled estimator (k draws; averaged over `draws`
independent caches, the difference shrinks like 1/sqrt(draws): no bias). Printed: the mean
per-token loss (the sampled one is reported minus the teacher entropy, i.e. as a KL
estimate), the relative error of the gradient ||g - g_full|| / ||g_full|| and its cosine with
g_full. This is not the quality-at-equal-tokens study of issue 18 (left out: compute).

    python bench/teacher_cache_bias.py [--teacher T] [--student S] [--text FILE]
                                       [--tokens 1024] [--seq 256] [--draws 8]
"""

import argparse

import numpy as np
import torch

W = "/tmp/minitron_bench_smollm2"


def logits_of(checkpoint: str, batches, ctx, runtime):
    from megatron_minitron.checkpoint.dist import load, read_header
    from megatron_minitron.config.parallel import ParallelConfig
    from megatron_minitron.models.builder import build_model

    model = read_header(checkpoint).model
    chunks = build_model(model, ParallelConfig(), runtime, ctx.device)
    load(checkpoint, chunks, ctx=ctx)
    chunks[0].eval()
    with torch.no_grad():
        out = [chunks[0](b["tokens"], b["position_ids"], None)[..., :model.vocab_size]
               for b in batches]
    return torch.cat([o.reshape(-1, o.shape[-1]) for o in out]).float(), model.vocab_size


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--teacher", default=f"{W}/teacher")
    p.add_argument("--student", default=f"{W}/pruned/activation_a37a824b1a")
    p.add_argument("--text", default=f"{W}/heldout_texts/devil.txt")
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--draws", type=int, default=8)
    a = p.parse_args()

    from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
    from megatron_minitron.distill import cache_records as rec
    from megatron_minitron.distill.cached_targets import SAMPLED, TOPK, CachedTargets
    from megatron_minitron.eval.perplexity import checkpoint_tokenizer, heldout_batches
    from megatron_minitron.runtime.distributed import initialize, teardown

    runtime = RuntimeConfig(precision="fp32")
    ctx = initialize(ParallelConfig(), runtime)
    tok = checkpoint_tokenizer(a.teacher)
    text = open(a.text, encoding="utf-8").read()[:a.tokens * 8]
    batches = heldout_batches(tok, text, a.seq, 1, num_samples=a.tokens // a.seq)
    t, v = logits_of(a.teacher, batches, ctx, runtime)  # [n, v]
    s, _ = logits_of(a.student, batches, ctx, runtime)
    logp, logq = torch.log_softmax(t, -1), torch.log_softmax(s, -1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    g_full = (logq.exp() - logp.exp()).double()

    def compare(name, per_token, grad):
        grad = grad.double()  # fp64 sums over n x vocab entries
        err = float((grad - g_full).norm() / g_full.norm())
        cos = float((grad * g_full).sum() / (grad.norm() * g_full.norm()))
        print(f"{name:<22} {float(per_token.mean()):>9.4f} {err:>10.4f} {cos:>8.4f}")

    n = t.shape[0]
    print(f"teacher {a.teacher}, student {a.student}, {n} tokens of {a.text}, vocab {v}")
    print(f"{'loss':<22} {'per token':>9} {'grad err':>10} {'cosine':>8}")
    compare("full forward KL", kl, g_full)
    for k in (8, 32, 128):
        r = rec.topk_record(logp, k, np.dtype(np.float16))
        c = CachedTargets(TOPK, torch.from_numpy(r["topk_ids"].astype(np.int64)),
                          torch.from_numpy(r["topk_logp"].astype(np.float32)),
                          torch.from_numpy(r["topk_tail"].astype(np.float32)))
        compare(f"top-{k} + tail", *c.divergence(s.clone(), 0, None))
    for k in (8, 32):
        loss_sum, grad_sum = 0.0, torch.zeros_like(g_full)  # fp64
        for d in range(a.draws):
            r = rec.sampled_record(logp, k, rec.sample_generator(d, 0, 0), np.dtype(np.float16))
            cnt = r["sampled_counts"].astype(np.float32)
            c = CachedTargets(SAMPLED, torch.from_numpy(r["sampled_ids"].astype(np.int64)),
                              torch.from_numpy(cnt / cnt.sum(-1, keepdims=True)),
                              torch.from_numpy(r["entropy"].astype(np.float32)))
            loss, grad = c.divergence(s.clone(), 0, None)
            loss_sum, grad_sum = loss_sum + loss, grad_sum.add_(grad.double())
            if d == 0:
                compare(f"sampled k={k}, 1 draw", loss, grad)
            del grad
        compare(f"sampled k={k}, mean {a.draws}", loss_sum / a.draws, grad_sum / a.draws)
    teardown()


if __name__ == "__main__":
    main()
