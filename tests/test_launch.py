"""launch/: the Slurm scripts run end to end on this machine (2 "nodes" x 2 CPU processes
through stand-in srun/scontrol), pre-emption -> save -> requeue -> resume, and shellcheck."""

import json
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STANDIN = Path(__file__).parent / "slurm_standin"
# TP2 x DP2 over 2 nodes x 2 processes; steps long enough to signal between them.
TRAIN = ["data.seq_length=128", "train.micro_batch_size=2", "train.global_batch_size=8",
         "train.train_iters=16", "train.eval_interval=0", "train.eval_iters=1",
         "train.optimizer.lr_warmup_iters=1", "parallel.tensor_model_parallel_size=2",
         "logger.backend=none", "logger.progress_bar=false"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sbatch(script, job_id, tmp_path, overrides, restart=None):
    """Run an sbatch file the way slurmd would on the job's first node: with the job's
    SLURM_* variables, our stand-in srun/scontrol first on PATH, and no torchrun variables
    (a pytest process that made a process group leaves MASTER_PORT and friends behind)."""
    drop = {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}
    env = {k: v for k, v in os.environ.items() if k not in drop and not k.startswith("SLURM")}
    env.update(PATH=f"{STANDIN}:{env['PATH']}", SLURM_JOB_ID=job_id, SLURM_JOBID=job_id,
               SLURM_JOB_NAME="minitron-train", SLURM_JOB_NUM_NODES="2", SLURM_NNODES="2",
               SLURM_JOB_NODELIST="127.0.0.[1-2]", SLURM_NODELIST="127.0.0.[1-2]",
               SLURM_SUBMIT_DIR=str(REPO), SLURM_SUBMIT_HOST="127.0.0.1", SLURM_NODEID="0",
               SLURM_PROCID="0", SLURM_LOCALID="0", SLURM_TASKS_PER_NODE="1(x2)",
               SLURM_STANDIN_LOG=str(tmp_path / "scontrol.log"), NPROC_PER_NODE="2",
               MINITRON_LOG_DIR=str(tmp_path / "logs"), MINITRON_RDZV_PORT=str(_free_port()),
               MINITRON_TRACEBACK="0")
    if restart is not None:  # Slurm sets it on a requeued job's next start
        env["SLURM_RESTART_COUNT"] = str(restart)
    return subprocess.Popen(["bash", str(REPO / "launch/slurm" / script), *overrides],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def records(run_dir):
    path = Path(run_dir) / "metrics.jsonl"
    out = {}
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:  # a line being written while we read
            continue
        if "lm_loss" in rec:
            out[rec["step"]] = rec
    return out


def losses(run_dir):
    return {step: rec["lm_loss"] for step, rec in records(run_dir).items()}


@pytest.mark.slow
def test_preempted_slurm_job_requeues_and_resumes_to_the_uninterrupted_curve(tmp_path):
    full = sbatch("train.sbatch", "101", tmp_path, [*TRAIN, f"run.dir={tmp_path / 'full'}"])
    run = tmp_path / "preempted"
    job = sbatch("train.sbatch", "102", tmp_path, [*TRAIN, f"run.dir={run}"])
    deadline = time.time() + 240
    while time.time() < deadline and job.poll() is None and len(losses(run)) < 2:
        time.sleep(0.05)
    assert job.poll() is None, job.stdout.read()
    job.send_signal(signal.SIGUSR1)  # what `#SBATCH --signal=B:USR1@120` does
    out = job.communicate(timeout=240)[0]
    assert job.returncode == 3, out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 102\n"
    saved = max(losses(run))
    assert saved < 16, "the job finished before the signal could stop it"
    assert (run / "checkpoints" / "latest").read_text().strip() == f"step_{saved:07d}"
    for node in (0, 1):
        log = tmp_path / "logs/minitron-train-102/restart0" / f"train-node{node}.log"
        assert log.stat().st_size > 0
    assert full.wait(timeout=240) == 0, full.stdout.read()

    # Slurm starts the requeued job again: same id, same overrides, SLURM_RESTART_COUNT=1.
    restarted_at = time.time()
    rerun = sbatch("train.sbatch", "102", tmp_path, [*TRAIN, f"run.dir={run}"], restart=1)
    out = rerun.communicate(timeout=240)[0]
    assert rerun.returncode == 0, out
    assert (tmp_path / "scontrol.log").read_text() == "requeue 102\n"
    assert (tmp_path / "logs/minitron-train-102/restart1/train-node1.log").exists()
    assert losses(run) == losses(tmp_path / "full")
    # Resumed, not redone: steps up to the checkpoint keep the first attempt's records.
    times = {step: rec["time"] for step, rec in records(run).items()}
    assert all((times[s] < restarted_at) == (s <= saved) for s in times), (saved, times)


def launch_scripts():
    return sorted(str(p.relative_to(REPO)) for p in [
        *REPO.glob("launch/**/*.sh"), *REPO.glob("launch/**/*.sbatch"),
        *REPO.glob("launch/**/*.env"), *REPO.glob("docker/*.sh")])


def test_shellcheck_passes_on_every_launch_and_docker_script():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (pip install -e .[dev] brings it)")
    scripts = launch_scripts()
    assert "launch/torchrun.sh" in scripts and "launch/slurm/common.sh" in scripts
    p = subprocess.run(["shellcheck", "--external-sources", *scripts], cwd=REPO,
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_launch_scripts_are_strict_bash():
    for rel in launch_scripts():
        text = (REPO / rel).read_text()
        if rel.endswith((".sh", ".sbatch")) and text.startswith("#!"):
            assert "set -euo pipefail" in text, rel
