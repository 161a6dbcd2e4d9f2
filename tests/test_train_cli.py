"""`minitron train` as users run it: exit codes, one-line errors, kill -9 and resume, resharding."""

import signal
import time

import torch
import yaml

from cli_process import losses, minitron
from distributed import run_distributed
from precision import FP32

FAST = ["data.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.eval_interval=0", "train.eval_iters=1", "logger.backend=none",
        "logger.progress_bar=false", "train.optimizer.lr_warmup_iters=1"]


def test_kill_dash_nine_then_resume_gives_the_uninterrupted_curve(tmp_path):
    # Bigger batches than FAST so a step outlasts our polling, even on a loaded machine.
    args = ["train", *FAST, "train.train_iters=10", "checkpoint.save_interval=2",
            "data.seq_length=256", "train.micro_batch_size=8", "train.global_batch_size=16"]
    full = minitron(*args, f"run.dir={tmp_path / 'full'}")
    assert full.wait(timeout=300) == 0, full.stderr.read()

    run = tmp_path / "killed"
    p = minitron(*args, f"run.dir={run}")
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(losses(run)) >= 3:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert len(losses(run)) < 10

    resumed = minitron(*args, f"run.dir={run}")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert losses(run) == losses(tmp_path / "full")


def test_missing_dataset_is_a_one_line_error_naming_the_field(tmp_path):
    p = minitron("train", *FAST, f"run.dir={tmp_path}", "data.paths=[/nonexistent/corpus]")
    assert p.wait(timeout=120) == 2
    err = p.stderr.read().strip().splitlines()
    assert len(err) == 1 and "data.paths" in err[0] and "Fix:" in err[0]


def test_unknown_stage_and_unknown_key(tmp_path):
    p = minitron("trian")
    assert p.wait(timeout=60) == 2
    p = minitron("train", "train.iters=3", f"run.dir={tmp_path}")
    assert p.wait(timeout=60) == 2
    assert "train.iters" in p.stderr.read()


def test_checkpoint_with_another_architecture_is_refused(tmp_path):
    p = minitron("train", *FAST, "train.train_iters=2", f"run.dir={tmp_path / 'a'}")
    assert p.wait(timeout=120) == 0, p.stderr.read()
    resolved = yaml.safe_load((tmp_path / "a" / "config.yaml").read_text())["resolved"]
    assert resolved["precision"] in ("fp32", "bf16") and "auto:" in resolved["precision_reason"]
    assert resolved["attention_impl"] == "sdpa" and resolved["transformer_impl"] == "local"
    p = minitron("train", *FAST, "train.train_iters=2", f"run.dir={tmp_path / 'b'}",
                 f"checkpoint.load={tmp_path / 'a' / 'checkpoints'}", "model.hidden_size=128")
    assert p.wait(timeout=120) == 2
    assert "model.hidden_size" in p.stderr.read()


def _logits(ckpt_dir, tp, save):
    from megatron_minitron.checkpoint import dist as ckpt
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import initialize

    cfg = load_config([f"parallel.tensor_model_parallel_size={tp}", "runtime.seed=3", FP32])
    ctx = initialize(cfg.parallel, cfg.runtime)
    chunks = build_model(cfg.model, cfg.parallel, cfg.runtime, ctx.device)
    if save:
        ckpt.save(ckpt_dir, 1, chunks, ckpt.CheckpointHeader(model=cfg.model), ctx=ctx)
    else:
        ckpt.load(ckpt_dir, chunks, ctx=ctx)
    ids = torch.randint(0, 257, (2, 24), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(24).expand(2, -1)
    with torch.no_grad():
        local = chunks[0].eval()(ids, pos, None)  # [b, s, v/tp]
    parts = [torch.empty_like(local) for _ in range(tp)]
    torch.distributed.all_gather(parts, local.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)


def test_checkpoint_saved_at_tp2_loads_at_tp1_with_the_same_logits(tmp_path):
    at_tp2 = run_distributed(_logits, 2, str(tmp_path), 2, True)[0]
    at_tp1 = run_distributed(_logits, 1, str(tmp_path), 1, False)[0]
    torch.testing.assert_close(at_tp1, at_tp2, rtol=1e-5, atol=1e-5)
