"""`minitron distill`: the KD step inside the one training loop, across layouts."""

import pytest

from distributed import run_distributed

BASE = ["data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.eval_interval=0", "train.eval_iters=1", "logger.backend=none",
        "logger.progress_bar=false", "train.optimizer.lr_warmup_iters=0"]


def _run(stage, run_dir, overrides):
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.training.lm import distill, train_lm
    from megatron_minitron.training.metrics import read_metrics

    cfg = load_config(BASE + [f"run.dir={run_dir}"] + overrides)
    (distill if stage == "distill" else train_lm)(cfg)
    return [m for m in read_metrics(run_dir) if "kd_loss" in m or "lm_loss" in m]


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    d = tmp_path_factory.mktemp("teacher")
    run_distributed(_run, 1, "train", str(d), ["train.train_iters=4"])
    return str(d / "checkpoints")


def test_student_equal_to_teacher_has_zero_kd(teacher, tmp_path):
    out = run_distributed(_run, 1, "distill", str(tmp_path), [
        "train.train_iters=2", f"distill.teacher_checkpoint={teacher}",
        f"checkpoint.load={teacher}", "train.optimizer.lr=1e-3"])[0]
    assert out[0]["kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert out[0]["lm_loss"] > 1.0


def test_first_distillation_steps_agree_at_tp1_tp2_dp2(teacher, tmp_path):
    common = ["train.train_iters=3", f"distill.teacher_checkpoint={teacher}", "runtime.seed=9"]
    # The student starts from its own random init, saved once and loaded by every layout.
    run_distributed(_run, 1, "train", str(tmp_path / "student0"),
                    ["train.train_iters=1", "runtime.seed=9"])
    load = [f"checkpoint.load={tmp_path / 'student0' / 'checkpoints'}"]
    curves = {name: run_distributed(_run, world, "distill", str(tmp_path / name),
                                    common + load + extra)[0]
              for name, world, extra in [("tp1", 1, []),
                                         ("tp2", 2, ["parallel.tensor_model_parallel_size=2"]),
                                         ("dp2", 2, [])]}
    ref = [m["kd_loss"] for m in curves["tp1"]]
    assert ref[0] > 1e-3 and ref[-1] < ref[0]
    for name, curve in curves.items():
        assert [m["kd_loss"] for m in curve] == pytest.approx(ref, rel=1e-5), name


def test_pipeline_parallel_distillation_is_refused_clearly(teacher, tmp_path):
    with pytest.raises(RuntimeError, match="parallel.pipeline_model_parallel_size"):
        run_distributed(_run, 2, "distill", str(tmp_path), [
            "train.train_iters=2", f"distill.teacher_checkpoint={teacher}",
            "parallel.pipeline_model_parallel_size=2"])
