"""Teacher-free distillation speed: one distillation step reading the teacher's cached
distributions (CachedKDStep: student forward/backward, fused cached-target loss, optimizer
step, cache lookups with shard decompression and token-hash checks) divided by one plain
cross-entropy training step (LMStep) of the same student on the same batches. Target: <= 1.10.
Both run in one process, interleaved round by round (bench/stats.py); median and range of the
per-round ratio, in wall and in CPU time. Student: the llama_10m shape (8 layers, hidden 256,
vocabulary 8192). The cache is a real one (teacher_cache.py shards and index) over `samples`
samples whose records come from random teacher logits (the records' content does not change
the step's cost); it holds more shards than the reader keeps open, so shards are re-read and
verified as a long run would. Also prints the cache's disk use per token.

    python bench/teacher_cache.py [--rounds 10] [--mode sampled|topk] [--k 32] [--seq 256]
                                  [--mbs 4] [--samples 96] [--student CKPT]

--student: time that checkpoint's architecture instead (e.g. the SmolLM2 student fixture
/tmp/minitron_bench_smollm2/pruned/activation_a37a824b1a, vocabulary 49,152: 16-bit ids); its
weights are loaded, the cache's records are still random.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from kd_step import bench_trainer  # noqa: E402
from stats import interleaved, ratio_summary  # noqa: E402


def write_cache(folder: Path, samples: int, seq: int, vocab: int, mode: str, k: int,
                shard: int):
    """A cache folder of `samples` random samples; their token tensors."""
    from megatron_minitron.distill import cache_records as rec
    from megatron_minitron.distill.teacher_cache import HEADER, INDEX, write_shard

    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (samples, seq + 1), generator=g)
    shards = {}
    for start in range(0, samples, shard):
        rows = []
        for i in range(start, min(samples, start + shard)):
            logp = torch.log_softmax(torch.randn(seq, vocab, generator=g) * 3, dim=-1)
            r = (rec.topk_record(logp, k, np.dtype(np.float16)) if mode == "topk" else
                 rec.sampled_record(logp, k, rec.sample_generator(0, 0, i), np.dtype(np.float16)))
            r.update(samples=np.int64(i), token_hash=rec.token_hash(tokens[i, :-1]))
            rows.append(r)
        name = write_shard(folder, "train", {n: np.stack([r[n] for r in rows]) for n in rows[0]})
        shards[name] = list(range(start, min(samples, start + shard)))
    header = {"mode": mode, "k": k, "temperature": 1.0, "seq_length": seq,
              "samples": {"train": samples, "valid": 0}}
    (folder / HEADER).write_text(json.dumps(header))
    (folder / INDEX).write_text(json.dumps({"complete": True, "shards": shards}))
    return tokens


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--mode", choices=["sampled", "topk"], default="sampled")
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--samples", type=int, default=96)
    p.add_argument("--shard", type=int, default=8)
    p.add_argument("--student", default=None)
    a = p.parse_args()

    from megatron_minitron.config.distill import DistillConfig
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.distill.cached_step import CachedKDStep
    from megatron_minitron.distill.teacher_cache import TeacherCache, disk_use
    from megatron_minitron.runtime.distributed import initialize, teardown
    from megatron_minitron.training.lm_step import LMStep

    cfg = load_config(["model=llama_10m", f"data.seq_length={a.seq}",
                       f"train.micro_batch_size={a.mbs}", f"train.global_batch_size={a.mbs}",
                       "runtime.precision=fp32", "logger.backend=none", "train.train_iters=1000"])
    if a.student:
        import dataclasses

        from megatron_minitron.checkpoint.dist import read_header

        cfg = dataclasses.replace(cfg, model=read_header(a.student).model)
    ctx = initialize(cfg.parallel, cfg.runtime)
    vocab = cfg.model.vocab_size
    folder = Path(tempfile.mkdtemp(prefix="minitron_cache_bench_"))
    tokens = write_cache(folder, a.samples, a.seq, vocab, a.mode, a.k, a.shard)
    cache = TeacherCache(str(folder))

    def batches():
        while True:
            for start in range(0, a.samples - a.mbs + 1, a.mbs):
                ids = tokens[start:start + a.mbs]
                yield {"tokens": ids[:, :-1], "labels": ids[:, 1:],
                       "loss_mask": torch.ones(a.mbs, a.seq),
                       "position_ids": torch.arange(a.seq).expand(a.mbs, -1),
                       "sample_key": torch.stack([torch.zeros(a.mbs, dtype=torch.long),
                                                  torch.arange(start, start + a.mbs)], -1)}

    def trainer(make_step):
        return bench_trainer(cfg, ctx, cfg.model, a.student, make_step)

    dcfg = DistillConfig(teacher_cache=str(folder), teacher_cache_estimator=a.mode)
    kd = trainer(lambda raw: CachedKDStep(dcfg, cache, raw[0], ctx.tp_group, vocab,
                                          ctx.device, num_microbatches=1))
    lm = trainer(lambda raw: LMStep(ctx.device, num_microbatches=1))
    kd_it, lm_it = batches(), batches()
    fns = {"cached_kd": lambda: kd.train_step(kd_it), "lm": lambda: lm.train_step(lm_it)}
    m = cfg.model
    print(f"student {a.student or 'llama_10m'} ({m.num_layers} layers, hidden {m.hidden_size}, vocab "
          f"{m.padded_vocab_size}), batch {a.mbs}x{a.seq}, fp32, cache {a.mode} k={a.k}, "
          f"{a.samples} samples in shards of {a.shard} (reader keeps {cache.keep} open), "
          f"threads {torch.get_num_threads()}")
    print(f"cache disk use: {disk_use(folder)}")
    med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
    for clock, what in ((time.perf_counter, "wall"), (time.process_time, "CPU")):
        times = interleaved(fns, a.rounds, clock=clock)
        print("  ".join(f"{k} {med(times[k]) * 1e3:.0f} ms" for k in fns) + f" ({what})")
        print(f"cached KD step / CE step, {what} time: "
              f"{ratio_summary(times['cached_kd'], times['lm'])}")
    teardown()


if __name__ == "__main__":
    main()
