"""SIGTERM (what Slurm and Kubernetes send before a kill) and a full disk during `minitron train`:
the first saves at the step's end and exits 3 (the requeue code launch/slurm relies on), a
second stops at once; a checkpoint save that hits ENOSPC exits 2 naming run.dir and leaves the
previous checkpoint intact and `latest` on it. Each run then resumes with the same command."""

import errno
import signal
import time

from cli_process import losses, minitron, minitron_in_process
from test_train_cli import FAST

from megatron_minitron.checkpoint import dist as ckpt

ARGS = ["train", *FAST, "train.train_iters=8", "checkpoint.save_interval=2",
        "data.seq_length=256", "train.micro_batch_size=8", "train.global_batch_size=16"]


def _until(p, ready, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and p.poll() is None and not ready():
        time.sleep(0.01)
    assert p.poll() is None, "the run ended before the signal: " + p.stderr.read()[-2000:]


def test_sigterm_saves_exits_for_requeue_and_the_rerun_gives_the_uninterrupted_curve(tmp_path):
    full = minitron(*ARGS, f"run.dir={tmp_path / 'full'}")
    assert full.wait(timeout=300) == 0, full.stderr.read()

    run = tmp_path / "term"
    p = minitron(*ARGS, f"run.dir={run}")
    _until(p, lambda: (run / "metrics.jsonl").exists() and len(losses(run)) >= 3)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=300)
    assert p.returncode == 3, err
    assert "SIGTERM: saving a checkpoint at the end of this step" in err
    assert "rerun the same command to resume" in err
    saved = ckpt.read_header(str(run / "checkpoints"))
    assert 3 <= saved.step < 8

    resumed = minitron(*ARGS, f"run.dir={run}")
    assert resumed.wait(timeout=300) == 0, resumed.stderr.read()
    assert losses(run) == losses(tmp_path / "full")


def test_a_second_sigterm_stops_at_once_and_the_run_still_resumes(tmp_path):
    run = tmp_path / "twice"
    p = minitron(*ARGS, f"run.dir={run}")
    _until(p, lambda: (run / "metrics.jsonl").exists() and len(losses(run)) >= 1)
    p.send_signal(signal.SIGTERM)
    for line in p.stderr:  # the handler says it has the first one
        if "SIGTERM: saving" in line:
            break
    p.send_signal(signal.SIGTERM)
    p.communicate(timeout=60)
    assert p.returncode == -signal.SIGTERM

    resumed = minitron(*ARGS, f"run.dir={run}")
    _, err = resumed.communicate(timeout=300)
    assert resumed.returncode == 0, err
    assert sorted(losses(run)) == list(range(1, 9))


def test_disk_full_during_a_save_exits_2_and_keeps_the_previous_checkpoint(tmp_path,
                                                                           monkeypatch):
    from megatron.core import dist_checkpointing

    real, calls = dist_checkpointing.save, []

    def fills_the_disk(sd, folder, *a, **kw):
        calls.append(folder)
        if len(calls) == 2:  # the second save: part of a shard written, then ENOSPC
            with open(f"{folder}/__0_0.distcp", "wb") as f:
                f.write(b"\0" * 4096)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(sd, folder, *a, **kw)

    monkeypatch.setattr(dist_checkpointing, "save", fills_the_disk)
    run = tmp_path / "full_disk"
    small = ["train", *FAST, "train.train_iters=6", "checkpoint.save_interval=2"]
    rc, out, err = minitron_in_process(*small, f"run.dir={run}")
    assert rc == 2, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("minitron: error: run.dir: no space left on the device"), line
    assert "bytes" in line and "rerun the same command" in line
    root = run / "checkpoints"
    assert (root / "latest").read_text() == "step_0000002"
    assert ckpt.damage(root / "step_0000002") is None
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_0000002"]

    monkeypatch.setattr(dist_checkpointing, "save", real)
    rc, out, err = minitron_in_process(*small, f"run.dir={run}")
    assert rc == 0, err
    assert ckpt.read_header(str(root)).step == 6
