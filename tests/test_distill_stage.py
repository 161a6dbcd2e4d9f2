"""`minitron distill`: the KD step inside the one training loop, across layouts."""

import pytest
import torch

from distributed import next_port, run_distributed
from precision import fp32_unless_set

BASE = ["data.seq_length=32", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.eval_interval=0", "train.eval_iters=1", "logger.backend=none",
        "logger.progress_bar=false", "train.optimizer.lr_warmup_iters=0"]
LAYOUTS = [("tp1", 1, []), ("tp2", 2, ["parallel.tensor_model_parallel_size=2"]),
           ("pp2", 2, ["parallel.pipeline_model_parallel_size=2"]), ("dp2", 2, [])]
# A student half as wide and half as deep as the tiny teacher (4 layers, hidden 64), so every
# hidden pair needs its projection; at PP=2 the embedding and [2, 1] terms come from stage 0.
SMALL_STUDENT = ["model.num_layers=2", "model.hidden_size=32", "runtime.seed=9"]
HIDDEN = ["distill.hidden_loss=cosine", "distill.layer_pairs=[[2,1],[4,2]]",
          "distill.embedding_loss=true"]
HIDDEN_TERMS = ("embedding_loss", "hidden_1_loss", "hidden_2_loss")


def _run(stage, run_dir, overrides):
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.training.lm import distill, train_lm
    from megatron_minitron.training.metrics import read_metrics

    cfg = load_config(fp32_unless_set(BASE + [f"run.dir={run_dir}"] + overrides))
    (distill if stage == "distill" else train_lm)(cfg)
    return [m for m in read_metrics(run_dir) if "kd_loss" in m or "lm_loss" in m]


def _export(checkpoint, hf_dir):
    """What dist_checkpointing holds and what HF export writes of a distilled checkpoint."""
    from megatron.core import dist_checkpointing
    from safetensors import safe_open

    from megatron_minitron.checkpoint import dist as ckpt
    from megatron_minitron.checkpoint.hf import mcore_to_hf

    saved = sorted(dist_checkpointing.load_tensors_metadata(str(ckpt.resolve(checkpoint))))
    mcore_to_hf(checkpoint, hf_dir, dtype="float32")
    with safe_open(f"{hf_dir}/model.safetensors", "pt") as f:
        return saved, list(f.keys())


def _jobs(jobs):
    """Several runs in one set of processes (each run initialises and tears down its own
    process groups): spawning and importing megatron is most of a tiny run's time. Each run
    gets its own rendezvous port, so no rank can meet a store left from the previous run."""
    out = []
    for kind, *args in jobs:
        next_port()
        out.append(_export(*args) if kind == "export" else _run(kind, *args))
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every distillation run of this module, grouped by layout: {layout: {run: metrics}}."""
    d = tmp_path_factory.mktemp("distill")
    teacher, student0, small = (str(d / n / "checkpoints") for n in
                                ("teacher", "student0", "small"))
    run_distributed(_jobs, 1, [
        ("train", str(d / "teacher"), ["train.train_iters=4"]),
        ("train", str(d / "student0"), ["train.train_iters=1", "runtime.seed=9"]),
        ("train", str(d / "small"), ["train.train_iters=1"] + SMALL_STUDENT)])
    common = ["train.train_iters=5", f"distill.teacher_checkpoint={teacher}", "runtime.seed=9"]
    plain = common + [f"checkpoint.load={student0}"]
    hidden = common + [f"checkpoint.load={small}"] + HIDDEN
    out = {}
    for name, world, layout in LAYOUTS[::-1]:  # tp1 last: it exports what pp2 saved
        jobs = [("distill", str(d / name / "plain"), plain + layout),
                ("distill", str(d / name / "hidden"), hidden + layout)]
        if name == "tp1":
            jobs += [
                ("distill", str(d / "same"), [
                    "train.train_iters=2", f"distill.teacher_checkpoint={teacher}",
                    f"checkpoint.load={teacher}", "train.optimizer.lr=1e-3",
                    "distill.hidden_loss=mse", "distill.layer_pairs=[[3,3]]"]),
                ("distill", str(d / "part"), hidden + ["train.exit_after_iters=2"]),
                ("distill", str(d / "part"), hidden),
                ("export", str(d / "pp2" / "hidden" / "checkpoints"), str(d / "hf"))]
        results = run_distributed(_jobs, world, jobs)[0]
        out[name] = dict(zip(("plain", "hidden", "same", "part", "resumed", "export"),
                             results))
    return out


def _assert_same_curves(runs, run, names):
    ref = runs["tp1"][run]
    assert len(ref) == 5
    for name, *_ in LAYOUTS:
        curve = runs[name][run]
        assert [m["step"] for m in curve] == [m["step"] for m in ref], name
        for key in names:
            assert [m[key] for m in curve] == pytest.approx([m[key] for m in ref], rel=1e-5), \
                (name, key)


def test_student_equal_to_teacher_has_zero_kd_and_zero_hidden_loss(runs):
    out = runs["tp1"]["same"]
    assert out[0]["kd_loss"] == pytest.approx(0.0, abs=1e-6)
    assert out[0]["hidden_3_loss"] == pytest.approx(0.0, abs=1e-8)  # same width: no projection
    assert out[0]["lm_loss"] > 1.0


def test_first_distillation_steps_agree_at_tp1_tp2_pp2_dp2(runs):
    ref = [m["kd_loss"] for m in runs["tp1"]["plain"]]
    assert ref[0] > 1e-3 and ref[-1] < ref[0]
    _assert_same_curves(runs, "plain", ("kd_loss", "lm_loss"))


def test_hidden_state_distillation_agrees_at_tp1_tp2_pp2_dp2(runs):
    ref = runs["tp1"]["hidden"]
    assert all(0.0 < ref[0][k] < 2.0 for k in HIDDEN_TERMS)  # cosine distances, all present
    assert ref[-1]["kd_loss"] < ref[0]["kd_loss"]
    assert ref[-1]["hidden_2_loss"] < ref[0]["hidden_2_loss"]  # the projections learn
    _assert_same_curves(runs, "hidden", ("kd_loss", "lm_loss") + HIDDEN_TERMS)


def test_projections_are_checkpointed_and_left_out_of_hf_export(runs):
    saved, exported = runs["tp1"]["export"]
    names = ("embedding", "hidden_1", "hidden_2")
    assert {k for k in saved if k.startswith("distill_hidden")} == {
        f"distill_hidden.projections.{n}.weight" for n in names}
    assert {k for k in saved if k.startswith("optimizer") and "distill_hidden" in k} == {
        f"optimizer.state.{m}.distill_hidden.projections.{n}.weight"
        for m in ("exp_avg", "exp_avg_sq") for n in names}
    assert exported and not [k for k in exported if "distill" in k]


def test_resume_continues_the_same_curve_projections_and_all(runs):
    full, resumed = runs["tp1"]["hidden"], runs["tp1"]["resumed"]
    assert [m["step"] for m in runs["tp1"]["part"]] == [1, 2]
    assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5]
    for key in ("kd_loss",) + HIDDEN_TERMS:
        assert [m[key] for m in resumed] == pytest.approx([m[key] for m in full], rel=1e-5), key


def test_stage_channel_carries_terms_with_their_gradient():
    from megatron_minitron.distill.pipeline_parallel import StageChannel

    ch = StageChannel(3, 5, ["embedding", "hidden_1"])
    student = torch.randn(4, 2, 3, requires_grad=True)
    term = (student ** 2).sum()
    sent = ch.pack(student, torch.randn(4, 2, 5), {}, {"embedding": term})  # [4, 2, 3 + 5 + 2]
    assert sent.shape == (4, 2, ch.width) and ch.adjust_tensor_shapes(
        [(4, 2, 3)], [(4, 2, 3)]) == ([(4, 2, 10)], [(4, 2, 10)])
    received = sent.detach().requires_grad_()  # what the next stage gets from p2p
    s_in, t_in, carried = ch.split(received)
    assert torch.equal(s_in, student.detach()) and not t_in.requires_grad
    assert carried["embedding"].item() == pytest.approx(term.item())
    (3.0 * carried["embedding"]).backward()
    sent.backward(received.grad)  # the previous stage's backward with the p2p gradient
    torch.testing.assert_close(student.grad, 3.0 * 2 * student.detach())


def test_pairs_split_over_pipeline_stages_are_refused():
    from megatron_minitron.config.errors import ConfigError
    from megatron_minitron.distill.pipeline_parallel import check_pairs_colocated

    check_pairs_colocated([(4, 2), (2, 1)], 4, 2, 2)
    with pytest.raises(ConfigError, match=r"pair \[3, 1\].*stage 1.*stage 0"):
        check_pairs_colocated([(3, 1)], 4, 2, 2)


def test_teacher_and_student_vocabularies_are_checked_before_loading():
    import dataclasses

    from megatron_minitron.checkpoint.dist import CheckpointHeader
    from megatron_minitron.config.errors import ConfigError
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.distill.teacher import check_vocabularies

    cfg = load_config(["model=tiny"])
    padded = dataclasses.replace(cfg.model, make_vocab_size_divisible_by=1000)
    assert padded.padded_vocab_size != cfg.model.padded_vocab_size
    check_vocabularies(CheckpointHeader(model=padded), cfg)  # TP=1: the common real vocabulary
    tp2 = load_config(["model=tiny", "parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="model.make_vocab_size_divisible_by=1000"):
        check_vocabularies(CheckpointHeader(model=padded), tp2)
    other = dataclasses.replace(cfg.model, vocab_size=cfg.model.vocab_size + 7)
    with pytest.raises(ConfigError, match="distill.teacher_checkpoint.*share a tokenizer"):
        check_vocabularies(CheckpointHeader(model=other), cfg)
