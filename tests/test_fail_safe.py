"""Fail-safe state: a diverging run stops and leaves only finite checkpoints, a damaged checkpoint
is refused (and resume falls back past it), and one run folder has one writer."""

import json
import os
import shutil
import signal
import time
from pathlib import Path

import pytest
import torch

from cli_process import minitron

FAST = ["data.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.eval_interval=0", "train.eval_iters=1", "logger.backend=none",
        "logger.progress_bar=false", "train.optimizer.lr_warmup_iters=0"]


def _run(*args, timeout=300):
    p = minitron(*args)
    out, err = p.communicate(timeout=timeout)
    return p.returncode, out, err


def _strict_json(line: str):
    def reject(constant):
        raise ValueError(f"{constant} is not JSON")

    return json.loads(line, parse_constant=reject)


def _tensors(step_dir: Path, tmp: Path):
    """Every tensor of a dist checkpoint (model and optimizer state), read without megatron."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    flat = tmp / f"{step_dir.name}.pt"
    dcp_to_torch_save(str(step_dir), str(flat))
    out = []

    def walk(name, v):
        if torch.is_tensor(v):
            out.append((name, v))
        elif isinstance(v, dict):
            for k, x in v.items():
                walk(f"{name}.{k}", x)
        elif isinstance(v, (list, tuple)):
            for i, x in enumerate(v):
                walk(f"{name}.{i}", x)

    walk("", torch.load(flat, weights_only=False))
    return out


def test_diverging_run_stops_with_a_named_error_and_only_finite_checkpoints(tmp_path):
    run = tmp_path / "run"
    rc, _, err = _run("train", *FAST, f"run.dir={run}", "train.train_iters=10",
                      "train.optimizer.lr=1e30", "train.optimizer.clip_grad=0",
                      "checkpoint.save_interval=1", "checkpoint.keep_last=20")
    lines = err.strip().splitlines()
    assert rc == 2, err
    assert "Traceback" not in err
    assert "train.max_nonfinite_steps" in lines[-1] and "Fix:" in lines[-1]
    records = [_strict_json(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    skipped = [r for r in records if r.get("skipped")]
    assert len(skipped) == 3 and skipped[-1]["skipped_steps"] == 3
    assert all(r["nonfinite"] and all(r[k] is None for k in r["nonfinite"]) for r in skipped)
    assert records[-1]["step"] < 10
    steps = sorted((run / "checkpoints").glob("step_*"))
    assert steps
    for s in steps:
        tensors = _tensors(s, tmp_path)
        assert any("exp_avg" in n for n, _ in tensors)  # the optimizer state is checked too
        bad = [n for n, t in tensors if t.is_floating_point() and not torch.isfinite(t).all()]
        assert not bad, (s.name, bad[:3])
    latest = (run / "checkpoints" / "latest").read_text().strip()
    assert latest in [s.name for s in steps]


def _flip(path: Path, at: int = 0) -> None:
    data = bytearray(path.read_bytes())
    for i in range(at, at + 8):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def _largest_shard(step: Path) -> Path:
    return max(step.glob("*.distcp"), key=lambda p: p.stat().st_size)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A run with checkpoints at steps 1, 2 and 3."""
    run = tmp_path_factory.mktemp("saved") / "run"
    rc, _, err = _run("train", *FAST, f"run.dir={run}", "train.train_iters=3",
                      "checkpoint.save_interval=1", "checkpoint.keep_last=3")
    assert rc == 0, err
    return run


def test_flipped_or_truncated_shard_is_a_named_error_unless_verify_is_off(saved, tmp_path):
    from megatron_minitron.checkpoint import dist as ckpt
    from megatron_minitron.checkpoint import integrity
    from megatron_minitron.config.errors import ConfigError

    header = json.loads((saved / "checkpoints" / "step_0000003" / ckpt.HEADER).read_text())
    assert header["files"] and all(len(f[integrity.DIGEST]) == 64
                                   for f in header["files"].values())
    for name, damage in [("flipped", _flip), ("truncated", lambda p: os.truncate(
            p, p.stat().st_size // 2))]:
        run = tmp_path / name
        shutil.copytree(saved, run)
        step = run / "checkpoints" / "step_0000003"
        shard = _largest_shard(step)
        size = shard.stat().st_size
        damage(shard)
        assert (shard.stat().st_size == size) == (name == "flipped")
        with pytest.raises(ConfigError) as e:
            ckpt.verified(str(step), "prune.checkpoint")
        assert e.value.field == "prune.checkpoint" and shard.name in str(e.value)
        ckpt.verified(str(step), "prune.checkpoint", verify=False)  # the user's choice
    integrity._checked.clear()


def test_truncated_shard_without_verification_is_still_a_named_error(saved, tmp_path):
    """torch's own checkpoint exception must not escape as a traceback."""
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    step = run / "checkpoints" / "step_0000002"
    shard = _largest_shard(step)
    os.truncate(shard, shard.stat().st_size // 3)
    rc, _, err = _run("train", *FAST, f"run.dir={tmp_path / 'other'}", "train.train_iters=1",
                      f"checkpoint.load={step}", "checkpoint.verify=false")
    assert rc == 2, err
    assert "Traceback" not in err and "[rank0]" not in err
    assert err.strip().splitlines()[-1].startswith("minitron: error: checkpoint.load:")


def test_damaged_teacher_is_a_named_error(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    teacher = run / "checkpoints" / "step_0000003"
    _flip(_largest_shard(teacher), at=50)
    rc, _, err = _run("distill", *FAST, f"run.dir={tmp_path / 'student'}", "train.train_iters=1",
                      f"distill.teacher_checkpoint={teacher}",
                      f"checkpoint.load={run / 'checkpoints' / 'step_0000002'}")
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("minitron: error: distill.teacher_checkpoint:") and "damaged" in line


def test_resume_falls_back_past_a_damaged_checkpoint(saved, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(saved, run)
    _flip(_largest_shard(run / "checkpoints" / "step_0000003"), at=100)
    rc, _, err = _run("train", *FAST, f"run.dir={run}", "train.train_iters=4")
    assert rc == 0, err
    warnings = [line for line in err.splitlines() if "damaged" in line]
    assert len(warnings) == 1 and "step_0000003" in warnings[0]
    assert "resuming from" in warnings[0] and "step_0000002" in warnings[0]
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[:3] == [1, 2, 3] and steps.count(3) == 1  # step 3 redone from step 2


def test_checkpoint_without_hashes_loads_unverified(saved, tmp_path, capsys):
    from megatron_minitron.checkpoint import dist as ckpt

    step = tmp_path / "old"
    shutil.copytree(saved / "checkpoints" / "step_0000001", step)
    header = json.loads((step / ckpt.HEADER).read_text())
    del header["files"]
    (step / ckpt.HEADER).write_text(json.dumps(header))
    _flip(_largest_shard(step))
    assert ckpt.verified(str(step), "checkpoint.load") == step
    assert "unverified" in capsys.readouterr().err


def test_content_digest_names_the_tensors_not_the_save(saved, tmp_path):
    """What keys the eval stage's score cache: two saves of the same tensors match (torch DCP's
    .metadata records the folder, a random save id and its entries in thread order)."""
    import pickle

    from megatron_minitron.checkpoint import dist as ckpt

    steps = saved / "checkpoints"
    digests = {ckpt.content_digest(str(steps / f"step_000000{i}")) for i in (1, 2, 3)}
    assert len(digests) == 3 and None not in digests
    copy = tmp_path / "copy"
    shutil.copytree(steps / "step_0000003", copy)
    meta_path = copy / ckpt.DCP_METADATA
    meta = pickle.loads(meta_path.read_bytes())
    meta.storage_meta.save_id = "another-save"
    meta.storage_meta.checkpoint_id = str(copy)
    meta.storage_data = dict(reversed(list(meta.storage_data.items())))
    meta_path.write_bytes(pickle.dumps(meta))
    assert ckpt.content_digest(str(copy)) == ckpt.content_digest(str(steps / "step_0000003"))
    header = json.loads((copy / ckpt.HEADER).read_text())
    header["step"] = 4
    (copy / ckpt.HEADER).write_text(json.dumps(header))
    assert ckpt.content_digest(str(copy)) not in digests
    del header["files"]
    (copy / ckpt.HEADER).write_text(json.dumps(header))
    assert ckpt.content_digest(str(copy)) is None


def test_second_writer_is_refused_and_a_killed_holder_does_not_block(tmp_path):
    run = tmp_path / "run"
    first = minitron("train", *FAST, f"run.dir={run}", "train.train_iters=2000")
    try:
        deadline = time.time() + 180
        while time.time() < deadline and first.poll() is None and not (
                run / "metrics.jsonl").exists():
            time.sleep(0.1)
        assert first.poll() is None, first.stderr.read()
        rc, _, err = _run("train", *FAST, f"run.dir={run}", "train.train_iters=1", timeout=120)
        assert rc == 2, err
        line = err.strip().splitlines()[-1]
        assert "run.dir" in line and str(first.pid) in line and "Fix:" in line
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(timeout=60)
    assert (run / ".lock").read_text().strip() == str(first.pid)  # left behind by kill -9
    rc, _, err = _run("train", *FAST, f"run.dir={run}", "train.train_iters=1", timeout=200)
    assert rc == 0, err


def test_the_lock_is_reentrant_within_a_process(tmp_path):
    from megatron_minitron.runtime.run_lock import hold_run_dir

    with hold_run_dir(str(tmp_path), 0):
        with hold_run_dir(str(tmp_path), 0):
            pass
        assert (tmp_path / ".lock").read_text().strip() == str(os.getpid())
    assert (tmp_path / ".lock").read_text() == ""


def test_nonfinite_optimizer_state_is_found_before_a_save():
    from types import SimpleNamespace

    from megatron_minitron.training.nonfinite import first_nonfinite

    model = torch.nn.Linear(4, 4)
    adam = torch.optim.Adam(model.parameters())
    optimizer = SimpleNamespace(chained_optimizers=[SimpleNamespace(optimizer=adam)])
    model(torch.ones(1, 4)).sum().backward()
    adam.step()
    assert first_nonfinite([model], optimizer, torch.device("cpu")) is None
    next(iter(adam.state.values()))["exp_avg_sq"][0, 0] = float("inf")
    assert first_nonfinite([model], optimizer, torch.device("cpu")) == "optimizer exp_avg_sq"


def test_metrics_are_strict_json_with_nonfinite_values_flagged(tmp_path):
    from megatron_minitron.config.train import LoggerConfig
    from megatron_minitron.training.metrics import MetricsWriter, read_metrics

    w = MetricsWriter(str(tmp_path), LoggerConfig(backend="none"), True)
    w.log(1, {"lm_loss": float("nan"), "grad_norm": float("inf"), "lr": 1.0})
    rec = _strict_json((tmp_path / "metrics.jsonl").read_text())
    assert rec["lm_loss"] is None and rec["grad_norm"] is None and rec["lr"] == 1.0
    assert rec["nonfinite"] == ["grad_norm", "lm_loss"]
    back = read_metrics(str(tmp_path))[0]
    assert back["lm_loss"] != back["lm_loss"] and "nonfinite" not in back


def _diverge(run_dir, extra):
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.training.lm import train_lm
    from megatron_minitron.training.nonfinite import NonFiniteError

    cfg = load_config(FAST + [f"run.dir={run_dir}", "train.train_iters=8",
                              "train.optimizer.lr=1e30", "train.optimizer.clip_grad=0",
                              "checkpoint.save_interval=1"] + extra)
    try:
        train_lm(cfg)
    except NonFiniteError as e:
        return e.field
    return None


def test_every_rank_stops_together_under_pipeline_parallelism(tmp_path):
    """Skip decisions, the save check, the lock and the checkpoint choice are agreed by all
    ranks: a disagreement would hang this test instead of raising on both."""
    from distributed import run_distributed

    fields = run_distributed(_diverge, 2, str(tmp_path),
                             ["parallel.pipeline_model_parallel_size=2"])
    assert fields == ["train.max_nonfinite_steps"] * 2
    assert (tmp_path / "checkpoints" / "latest").is_file()
