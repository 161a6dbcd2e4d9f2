"""Distilling an MoE student from an MoE teacher (model=tiny_moe, logit KD, the router's
load-balancing loss in the gradient): the first steps' losses agree at EP=1, EP=2 and DP=2."""

import pytest

from distributed import run_distributed
from test_distill_stage import BASE, _jobs

MOE = ["model=tiny_moe", "runtime.transformer_impl=local", "runtime.precision=fp32"]
LAYOUTS = [("ep1", 1, []), ("ep2", 2, ["parallel.expert_model_parallel_size=2"]),
           ("dp2", 2, [])]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    d = tmp_path_factory.mktemp("moe_distill")
    teacher, student = (str(d / n / "checkpoints") for n in ("teacher", "student"))
    run_distributed(_jobs, 1, [
        ("train", str(d / "teacher"), MOE + ["train.train_iters=3"]),
        ("train", str(d / "student"), MOE + ["train.train_iters=1", "runtime.seed=9"])])
    common = MOE + ["train.train_iters=3", f"distill.teacher_checkpoint={teacher}",
                    f"checkpoint.load={student}", "runtime.seed=9"]
    return {name: run_distributed(_jobs, world, [
        ("distill", str(d / name), common + layout)])[0][0] for name, world, layout in LAYOUTS}


def test_first_moe_distillation_steps_agree_at_ep1_ep2_dp2(runs):
    ref = runs["ep1"]
    assert len(ref) == 3 and ref[0]["kd_loss"] > 1e-3
    for name, *_ in LAYOUTS:
        for key in ("kd_loss", "lm_loss"):
            assert [m[key] for m in runs[name]] == pytest.approx(
                [m[key] for m in ref], rel=1e-5), (name, key)
