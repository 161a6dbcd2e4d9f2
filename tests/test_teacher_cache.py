"""`minitron cache-teacher` and `minitron distill distill.teacher_cache=...`: a cache written
once reads to the same losses at TP=1/TP=2, DP=1/DP=2 and micro-batch 2/4; an interrupted
write resumes (at another layout) to the same records; a cache of another teacher or other
data is refused by name."""

import shutil
from pathlib import Path

import numpy as np
import pytest

from cli_process import dead_pid, minitron
from distributed import next_port, run_distributed
from megatron_minitron.runtime.atomic_files import TMP_TAG
from precision import fp32_unless_set

BASE = ["data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.eval_interval=0", "train.eval_iters=1", "logger.backend=none",
        "logger.progress_bar=false", "train.optimizer.lr_warmup_iters=0"]
CACHE = ["cache.mode=both", "cache.k=8", "cache.shard_samples=4", "train.train_iters=3",
         "runtime.seed=9"]


def _run(stage, run_dir, overrides):
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.distill.cache_writer import write_cache
    from megatron_minitron.training.lm import distill, train_lm
    from megatron_minitron.training.metrics import read_metrics

    cfg = load_config(fp32_unless_set(BASE + [f"run.dir={run_dir}"] + overrides))
    if stage == "cache":
        return str(write_cache(cfg))
    {"distill": distill, "train": train_lm}[stage](cfg)
    return [m for m in read_metrics(run_dir) if "kd_loss" in m]


def _jobs(jobs):
    out = []
    for job in jobs:
        next_port()
        out.append(_run(*job))
    return out


def records(folder):
    """{(split, sample): {array name: record}} of every shard in a cache folder."""
    out = {}
    for p in Path(folder).glob("*.npz"):
        with np.load(p) as z:
            for row, i in enumerate(z["samples"]):
                out[(p.name.split("-")[0], int(i))] = {k: z[k][row] for k in z.files}
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    teacher, student, other = (str(d / n / "checkpoints") for n in ("teacher", "s0", "other"))
    cache = str(d / "cache")
    distill = ["train.train_iters=3", f"checkpoint.load={student}", "runtime.seed=9",
               f"distill.teacher_cache={cache}"]
    one = run_distributed(_jobs, 1, [
        ("train", str(d / "teacher"), ["train.train_iters=4"]),
        ("train", str(d / "s0"), ["train.train_iters=1", "runtime.seed=9"]),
        ("train", str(d / "other"), ["train.train_iters=1", "runtime.seed=5"]),
        ("cache", str(d / "c"), CACHE + [f"distill.teacher_checkpoint={teacher}",
                                         f"cache.output={cache}"]),
        ("distill", str(d / "tp1"), distill),
        ("distill", str(d / "tp1_topk"), distill + ["distill.teacher_cache_estimator=topk",
                                                    "distill.ce_weight=0.5"]),
        ("distill", str(d / "mbs4"), distill + ["train.micro_batch_size=4"])])[0]
    # an interrupted write: no index, a shard lost, one damaged, a temporary file left over
    partial = d / "partial"
    shutil.copytree(cache, partial)
    (partial / "index.json").unlink()
    shards = sorted(partial.glob("train-*.npz"))
    shards[0].unlink()
    shards[1].write_bytes(shards[1].read_bytes()[:-10])
    (partial / f"train-0000000099{TMP_TAG}{dead_pid()}").write_bytes(b"x")  # a killed writer's
    two = run_distributed(_jobs, 2, [
        ("distill", str(d / "tp2"), distill + ["parallel.tensor_model_parallel_size=2"]),
        ("distill", str(d / "tp2_topk"), distill + ["parallel.tensor_model_parallel_size=2",
                                                    "distill.teacher_cache_estimator=topk",
                                                    "distill.ce_weight=0.5"]),
        ("distill", str(d / "dp2"), distill),
        ("cache", str(d / "c2"), CACHE + [f"distill.teacher_checkpoint={teacher}",
                                          f"cache.output={partial}"]),
        ("cache", str(d / "c3"), CACHE + [f"distill.teacher_checkpoint={teacher}",
                                          f"cache.output={d / 'cache_tp2'}",
                                          "parallel.tensor_model_parallel_size=2"]),
        ("cache", str(d / "c4"), CACHE + [f"distill.teacher_checkpoint={teacher}",
                                          f"cache.output={d / 'cache_pp2'}",
                                          "parallel.pipeline_model_parallel_size=2"])])[0]
    return dict(d=d, teacher=teacher, other=other, cache=cache, partial=str(partial),
                tp1=one[4], tp1_topk=one[5], mbs4=one[6], tp2=two[0], tp2_topk=two[1],
                dp2=two[2])


def _same(a, b):
    assert [m["step"] for m in a] == [m["step"] for m in b] and len(a) >= 3
    for key in ("kd_loss", "lm_loss"):
        assert [m[key] for m in a] == pytest.approx([m[key] for m in b], rel=1e-5), key


@pytest.mark.parametrize("layout", ["tp2", "dp2", "mbs4"])
def test_cache_reads_to_the_same_losses_at_every_layout(runs, layout):
    _same(runs[layout], runs["tp1"])


def test_topk_estimator_reads_the_same_at_tp2(runs):
    _same(runs["tp2_topk"], runs["tp1_topk"])
    # and it is another loss than the sampled one
    assert runs["tp1_topk"][0]["kd_loss"] != pytest.approx(runs["tp1"][0]["kd_loss"], rel=1e-3)


def test_interrupted_write_resumes_to_the_same_records(runs):
    full, resumed = records(runs["cache"]), records(runs["partial"])
    assert full.keys() == resumed.keys() and len(full) == 3 * 4 + 4
    assert (Path(runs["partial"]) / "index.json").is_file()
    assert not list(Path(runs["partial"]).glob(f"*{TMP_TAG}*"))
    for key, want in full.items():
        got = resumed[key]
        for name in ("samples", "token_hash", "topk_ids", "sampled_ids", "sampled_counts"):
            assert (got[name] == want[name]).all(), (key, name)
        for name in ("topk_logp", "topk_tail", "entropy"):
            np.testing.assert_allclose(got[name], want[name], atol=2e-3)


@pytest.mark.parametrize("layout", ["cache_tp2", "cache_pp2"])
def test_cache_written_at_tp2_or_pp2_holds_the_same_records(runs, layout):
    full, other = records(runs["cache"]), records(runs["d"] / layout)
    assert full.keys() == other.keys()
    for key, want in full.items():
        got = other[key]
        for name in ("samples", "token_hash"):
            assert (got[name] == want[name]).all()
        # the teacher's logits differ by rounding across layouts: ids may swap at near ties
        for name in ("topk_ids", "sampled_ids", "sampled_counts"):
            assert (got[name] == want[name]).mean() > 0.98, (key, name)
        for name in ("topk_tail", "entropy"):
            np.testing.assert_allclose(got[name], want[name], atol=2e-3)


def _refused(runs, *overrides):
    p = minitron("distill", *BASE, f"run.dir={runs['d']}/refused", "train.train_iters=3",
                 f"checkpoint.load={runs['teacher']}", f"distill.teacher_cache={runs['cache']}",
                 *overrides)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("minitron: error")]
    assert len(lines) == 1 and "distill.teacher_cache" in lines[0], err
    return lines[0]


def test_cache_of_another_teacher_is_refused(runs):
    assert "another teacher" in _refused(runs, f"distill.teacher_checkpoint={runs['other']}")


def test_cache_of_other_data_is_refused(runs):
    assert "other data" in _refused(runs, "runtime.seed=5")  # the seed orders the samples


def test_incomplete_cache_is_refused(runs, tmp_path):
    shutil.copytree(runs["cache"], tmp_path / "c")
    (tmp_path / "c" / "index.json").unlink()
    p = minitron("distill", *BASE, f"run.dir={tmp_path}/r", f"distill.teacher_cache="
                 f"{tmp_path / 'c'}", f"checkpoint.load={runs['teacher']}")
    _, err = p.communicate(timeout=600)
    assert p.returncode == 2 and "distill.teacher_cache" in err and "complete" in err, err


def test_pipeline_builds_one_cache_read_by_search_and_distill(tmp_path):
    """pipeline.teacher_cache=true: a teacher_cache stage, then every search candidate and
    the distill stage read it (their resolved configs name it; no teacher model is built)."""
    p = minitron("pipeline", "experiment=smoke", f"run.dir={tmp_path}", "pipeline.target=search",
                 "search.max_candidates=2", "search.distill_iters=2", "search.eval_iters=1",
                 "pipeline.distill_iters=2", "pipeline.export=false", "pipeline.correction_iters=4",
                 "pipeline.teacher_cache=true")
    _, err = p.communicate(timeout=900)
    assert p.returncode == 0, err[-3000:]
    cache = str(tmp_path / "teacher_cache" / "cache")
    assert (Path(cache) / "index.json").is_file()
    runs = [tmp_path / "distill"] + [q for q in (tmp_path / "search").iterdir() if q.is_dir()]
    assert len(runs) == 3
    for run in runs:
        assert f"teacher_cache: {cache}" in (run / "config.yaml").read_text(), run


def test_second_cache_writer_on_one_folder_is_refused(runs, tmp_path):
    import subprocess
    import sys

    folder = tmp_path / "held"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\n"
         "from megatron_minitron.runtime.run_lock import hold_run_dir\n"
         f"with hold_run_dir({str(folder)!r}, 0, 'cache.output'):\n"
         "    print('held', flush=True); time.sleep(600)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        p = minitron("cache-teacher", *BASE, *CACHE, f"run.dir={tmp_path}/r",
                     f"distill.teacher_checkpoint={runs['teacher']}", f"cache.output={folder}")
        _, err = p.communicate(timeout=300)
        assert p.returncode == 2, err
        line = err.strip().splitlines()[-1]
        assert "cache.output" in line and str(holder.pid) in line
        assert not list(folder.glob("*.npz")) and not (folder / "header.json").exists()
    finally:
        holder.kill()
        holder.wait(timeout=60)


def _distill_without_teacher(run_dir, overrides):
    """A cached distillation with the teacher's builder replaced by a failure: the checkpoints
    it loads, and its metrics."""
    import megatron_minitron.checkpoint.dist as ckpt
    import megatron_minitron.distill.teacher as teacher

    def refuse(*args, **kw):
        raise AssertionError("a cached distillation built the teacher")

    loaded, real_load = [], ckpt.load
    teacher.build_teacher = refuse
    ckpt.load = lambda path, *a, **kw: loaded.append(str(path)) or real_load(path, *a, **kw)
    return loaded, _run("distill", run_dir, overrides)


def test_cached_distillation_builds_and_loads_no_teacher(runs):
    d = runs["d"]
    student = str(d / "s0" / "checkpoints")
    (loaded, metrics), = run_distributed(_distill_without_teacher, 1, str(d / "no_teacher"), [
        "train.train_iters=2", f"checkpoint.load={student}", "runtime.seed=9",
        f"distill.teacher_cache={runs['cache']}", f"distill.teacher_checkpoint={runs['teacher']}"])
    assert len(metrics) == 2 and all(m["kd_loss"] == m["kd_loss"] for m in metrics)  # not NaN
    assert loaded and all(runs["teacher"] not in p for p in loaded), loaded
