"""train.time_budget_s / pipeline.distill_time_budget_s: training for seconds instead of steps,
the warmup-stable-decay rate over the share of time spent, resume of a budget, bad settings."""

import json
import types

import pytest

from cli_process import minitron
from distributed import next_port, run_distributed
from precision import fp32_unless_set

BASE = ["model=tiny", "data.seq_length=32", "train.micro_batch_size=2",
        "train.global_batch_size=4", "train.eval_iters=1", "train.eval_interval=0",
        "logger.backend=none", "logger.progress_bar=false", "train.optimizer.lr_warmup_iters=0",
        "train.train_iters=100", "train.optimizer.lr=1e-3", "train.optimizer.min_lr=1e-4"]
STEP_S = 0.5
"""Seconds of every step under the fake clock."""


class FakeClock:
    """Each call is STEP_S later than the one before: a step (read before and after) takes
    STEP_S."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        self.now += STEP_S
        return self.now


def _train(run_dir, overrides):
    from megatron_minitron.checkpoint import dist as ckpt
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.runtime.distributed import initialize
    from megatron_minitron.training.lm_step import LMStep
    from megatron_minitron.training.metrics import read_metrics
    from megatron_minitron.training.session import adopt_model_config, build_trainer, find_start
    from synthetic import SyntheticSource

    next_port()
    cfg = load_config(fp32_unless_set(BASE + [f"run.dir={run_dir}"] + overrides))
    ctx = initialize(cfg.parallel, cfg.runtime)
    start = find_start(cfg)
    cfg = adopt_model_config(cfg, start, model_overridden=False)
    data = SyntheticSource(cfg.data.seq_length, cfg.model.vocab_size,
                           cfg.train.micro_batch_size, ctx.dp_rank, ctx.dp_size)
    trainer, state = build_trainer(cfg, ctx, start, lambda chunks: LMStep(ctx.device),
                                   data, {"type": "byte"})
    trainer.clock = FakeClock()
    state = trainer.run(state)
    trainer.writer.close()
    header = ckpt.read_header(str(ckpt.resolve(cfg.checkpoint_root)))
    rows = [m for m in read_metrics(run_dir) if "lm_loss" in m]
    return {"step": state.step, "budget_spent": state.budget_spent,
            "train_seconds": state.train_seconds, "header_extra": header.extra,
            "curve": [(m["step"], m["lm_loss"], m["lr"], m.get("train_seconds"))
                      for m in rows]}


def _jobs(root, jobs):
    return {name: _train(f"{root}/{name.split('@')[0]}", overrides) for name, overrides in jobs}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("time_budget"))
    wsd = ["train.time_budget_s=2.0", "train.optimizer.lr_decay_style=wsd",
           "train.optimizer.lr_wsd_decay_fraction=0.5"]
    return run_distributed(_jobs, 1, root, [
        ("wsd", wsd),
        ("part", wsd + ["train.exit_after_iters=2"]),
        ("part@2", wsd),
        ("constant", ["train.time_budget_s=1.2", "train.optimizer.lr_decay_style=constant"]),
        ("steps", ["train.train_iters=3", "train.optimizer.lr_decay_style=wsd",
                   "train.optimizer.lr_wsd_decay_fraction=0.5"])])[0]


def test_a_budget_stops_the_run_once_its_seconds_are_spent(runs):
    r = runs["wsd"]
    assert r["step"] == 4 and r["budget_spent"]  # 4 steps of 0.5 s fill 2.0 s; 100 allowed
    assert [s for s, *_ in r["curve"]] == [1, 2, 3, 4]
    assert [t for *_, t in r["curve"]] == [0.5, 1.0, 1.5, 2.0]
    assert r["header_extra"]["train_seconds"] == 2.0
    c = runs["constant"]  # 3 steps reach 1.5 >= 1.2 s
    assert c["step"] == 3 and [lr for _, _, lr, _ in c["curve"]] == [1e-3] * 3


def test_wsd_decays_over_the_last_fraction_of_the_time(runs):
    # the logged lr is the next step's: after 0.5, 1.0 s held at the peak; the decay starts at
    # half the budget and reaches min_lr when it is spent
    lrs = [lr for _, _, lr, _ in runs["wsd"]["curve"]]
    assert lrs == pytest.approx([1e-3, 1e-3, 1e-4 + 0.5 * 9e-4, 1e-4])


def test_a_resumed_budget_continues_where_it_stopped(runs):
    part, resumed, full = runs["part"], runs["part@2"], runs["wsd"]
    assert part["step"] == 2 and not part["budget_spent"]
    assert part["header_extra"]["train_seconds"] == 1.0
    assert resumed["step"] == 4 and resumed["train_seconds"] == 2.0  # 2 more steps, not 4
    assert resumed["curve"] == full["curve"]  # same losses, same rates, same seconds


def test_wsd_without_a_budget_decays_over_the_steps(runs):
    r = runs["steps"]
    assert r["step"] == 3 and not r["budget_spent"]
    assert "train_seconds" not in r["header_extra"]
    lrs = [lr for _, _, lr, _ in r["curve"]]
    assert lrs[0] == pytest.approx(1e-3) and lrs[-1] == pytest.approx(1e-4)
    assert lrs[1] < lrs[0]


def test_wsd_coefficient_and_the_rate_it_sets():
    from megatron_minitron.config.train import TrainConfig, OptimizerConfig
    from megatron_minitron.training.time_budget import TimeBudget, wsd_coefficient

    assert [wsd_coefficient(f, 0.2) for f in (0.0, 0.8, 0.9, 1.0)] == \
        pytest.approx([1.0, 1.0, 0.5, 0.0])
    budget = TimeBudget.of(TrainConfig(time_budget_s=10.0, optimizer=OptimizerConfig(
        lr_decay_style="wsd", lr_wsd_decay_fraction=0.2)))
    groups = [{"lr": 0.0}, {"lr": 0.0, "max_lr": 2e-3, "min_lr": 0.0}]
    sched = types.SimpleNamespace(optimizer=types.SimpleNamespace(param_groups=groups),
                                  lr_warmup_steps=8, num_steps=8, max_lr=1e-3, min_lr=1e-4)
    budget.set_lr(sched, 9.0)
    assert groups[0]["lr"] == 0.0  # still in warmup: megatron's scheduler owns the rate
    sched.num_steps = 9
    budget.set_lr(sched, 9.0)
    assert [g["lr"] for g in groups] == pytest.approx([1e-4 + 0.5 * 9e-4, 1e-3])
    assert TimeBudget.of(TrainConfig()) is None


@pytest.mark.parametrize("overrides,field", [
    (["train.time_budget_s=60"], "train.optimizer.lr_decay_style"),  # the default is cosine
    (["train.time_budget_s=-1", "train.optimizer.lr_decay_style=constant"],
     "train.time_budget_s"),
    (["train.optimizer.lr_wsd_decay_fraction=0"], "train.optimizer.lr_wsd_decay_fraction"),
    (["pipeline.distill_time_budget_s=60"], "pipeline.distill_time_budget_s"),
    (["pipeline.distill_time_budget_s=-1"], "pipeline.distill_time_budget_s"),
])
def test_bad_budget_settings_name_their_field(overrides, field):
    from megatron_minitron.config.errors import ConfigError
    from megatron_minitron.config.loader import load_config

    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    assert e.value.field == field


def test_pipeline_refuses_a_budget_for_a_step_counted_schedule_before_any_stage(tmp_path):
    p = minitron("pipeline", "experiment=smoke", f"run.dir={tmp_path / 'run'}",
                 "pipeline.distill_time_budget_s=60", "train.optimizer.lr_decay_style=linear")
    out, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "pipeline.distill_time_budget_s" in err and "constant or wsd" in err
    assert not list((tmp_path / "run").glob("*/stage.json"))


def test_pipeline_distills_for_its_time_budget(tmp_path):
    """A budget one step exceeds: the distill stage stops after one step of distill_iters=12,
    finishes (eval, export, report run), and the summary counts the tokens it used."""
    run = tmp_path / "run"
    p = minitron("pipeline", "experiment=smoke", f"run.dir={run}", "pipeline.correction_iters=0",
                 "pipeline.distill_time_budget_s=1e-6", "train.optimizer.lr_decay_style=wsd")
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert rows["distilled"]["tokens"] - rows["pruned"]["tokens"] == 8 * 64  # one step
    steps = [json.loads(line)["step"] for line in
             (run / "distill" / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 1
    assert (run / "export" / "stage.json").is_file() and summary["export"]
