"""W&B: a short job logs to an offline run folder (every loss term, throughput, the config once,
the run's name/group/tags), and a resumed job continues the same run id."""

import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("wandb")

SHORT = ["data.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4",
         "train.eval_interval=0", "train.eval_iters=1", "train.optimizer.lr_warmup_iters=1",
         "logger.progress_bar=false", "logger.backend=wandb", "logger.mode=offline",
         "logger.project=minitron-tests", "logger.group=g1", "logger.tags=[ci,tiny]"]

BLOCK = 32768
CHUNK_HEADER = 7  # crc32 (4), length (2), type (1): the LevelDB log format W&B writes


def read_wandb_records(path: Path):
    """The protobuf Records of a .wandb file (W&B's 7-byte header, then LevelDB log chunks),
    parsed with W&B's own schema."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", "not a W&B transaction log"
    pos, payload, records = 7, b"", []
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer padding
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left_in_block
            continue
        payload += data[pos + CHUNK_HEADER:pos + CHUNK_HEADER + length]
        pos += CHUNK_HEADER + length
        if kind in (1, 4):  # FULL or LAST: a whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(payload)
            records.append(rec)
            payload = b""
    return records


def offline_runs(run_dir: Path):
    return sorted((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


def train(run_dir, *extra):
    env = {k: v for k, v in os.environ.items()
           if k not in {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    env.pop("WANDB_MODE", None)  # conftest disables W&B for every other test
    env.update(MINITRON_TRACEBACK="0", WANDB_DIR=str(run_dir))
    p = subprocess.run([sys.executable, "-m", "megatron_minitron.cli.main", "train", *SHORT,
                        f"run.dir={run_dir}", *extra], env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr


def history(records):
    """[(step, {key: value})] of the run's history rows."""
    rows = []
    for r in records:
        if r.WhichOneof("record_type") == "history":
            items = {i.key or "/".join(i.nested_key): i.value_json for i in r.history.item}
            rows.append((r.history.step.num, items))
    return rows


def test_offline_run_has_metrics_config_once_and_a_resumed_job_keeps_its_id(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "train.train_iters=4", "train.exit_after_iters=2",
          "checkpoint.save_interval=2")
    train(run_dir, "train.train_iters=4")

    first, second = offline_runs(run_dir)
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    assert first.name == second.name == f"run-{run_id}.wandb"

    records = [read_wandb_records(f) for f in (first, second)]
    runs = [next(r.run for r in recs if r.WhichOneof("record_type") == "run") for recs in records]
    for run in runs:
        assert run.run_id == run_id and run.project == "minitron-tests"
        assert run.display_name == "run" and run.run_group == "g1"
        assert list(run.tags) == ["ci", "tiny"]
    # The config is logged when the run starts, not again by the resumed job.
    config_keys = [{u.key for u in run.config.update if u.key != "_wandb"} for run in runs]
    assert {"model", "train", "parallel", "logger"} <= config_keys[0]
    assert config_keys[1] == set()

    rows = history(records[0]) + history(records[1])
    steps = [items["_step"] for _, items in rows if "lm_loss" in items]
    assert steps == ["1", "2", "3", "4"]
    for _, items in rows:
        if "lm_loss" in items:
            assert {"lm_loss", "grad_norm", "lr", "tokens_per_s", "consumed_tokens"} <= set(items)
    assert any("valid_lm_loss" in items for _, items in rows)
