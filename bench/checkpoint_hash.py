"""Cost of checkpoint integrity: a training checkpoint save (weights + Adam state) with the
per-file sha256 table written into minitron.json, divided by the same save without it,
interleaved round by round in one process; and the cost of verifying it at load.

    python bench/checkpoint_hash.py [model=llama_10m] [rounds=5] [work=/tmp/minitron_bench_hash]

Printed: checkpoint size, median seconds of each save, the median and range of the per-round
ratio, and the seconds to verify one checkpoint (a cold process reads the files again).
"""

import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knobs import parse_knobs  # noqa: E402
from stats import interleaved, ratio_summary  # noqa: E402

KNOBS = {"model": "llama_10m", "rounds": 5, "work": "/tmp/minitron_bench_hash"}


def main(argv):
    k = parse_knobs(argv, KNOBS)
    from megatron_minitron.checkpoint import dist as ckpt
    from megatron_minitron.checkpoint import integrity
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import initialize, teardown
    from megatron_minitron.training.optimizer import build_optimizer, wrap_ddp

    cfg = load_config([f"model={k['model']}", "train.optimizer.lr_warmup_iters=0"])
    ctx = initialize(cfg.parallel, cfg.runtime)
    chunks = wrap_ddp(build_model(cfg.model, cfg.parallel, cfg.runtime, ctx.device))
    optimizer, _ = build_optimizer(chunks, cfg.train.optimizer, cfg.train)
    for c in chunks:  # one update so that Adam's moments exist and are saved
        for p in c.parameters():
            p.main_grad.fill_(1e-3)
    optimizer.step()
    work = Path(k["work"])
    shutil.rmtree(work, ignore_errors=True)
    real_hash = integrity.hash_files

    def save(hashing: bool):
        def run():
            integrity.hash_files = real_hash if hashing else (lambda folder, skip: {})
            ckpt.save(str(work / ("hashed" if hashing else "plain")), 1, chunks,
                      ckpt.CheckpointHeader(model=cfg.model), optimizer=optimizer, ctx=ctx)
        return run

    times = interleaved({"hashed": save(True), "plain": save(False)}, k["rounds"])
    integrity.hash_files = real_hash
    step = ckpt.resolve(str(work / "hashed"))
    size = sum(p.stat().st_size for p in step.iterdir())
    t = time.perf_counter()
    integrity._checked.clear()
    assert ckpt.damage(step) is None
    verify_s = time.perf_counter() - t
    print(f"model {k['model']}: checkpoint {size / 2**20:.1f} MiB in "
          f"{len(list(step.iterdir()))} files")
    print(f"save with hashes {statistics.median(times['hashed']):.3f} s, without "
          f"{statistics.median(times['plain']):.3f} s; ratio "
          f"{ratio_summary(times['hashed'], times['plain'])}")
    print(f"verify at load: {verify_s:.3f} s ({size / 2**20 / verify_s:.0f} MiB/s)")
    teardown()
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
