"""Where numbers go: metrics.jsonl (always), W&B (optional, offline by default), the console."""

import json
import math
import os
import secrets
import time
from pathlib import Path
from typing import Dict, Optional

from megatron_minitron.config.train import LoggerConfig
from megatron_minitron.runtime import atomic_files

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Rank-0 sink for one stage. Other ranks get a writer whose methods do nothing."""

    def __init__(self, run_dir: str, cfg: LoggerConfig, enabled: bool, config_dict: Optional[dict]
                 = None, resume_step: int = 0):
        self.enabled = enabled
        self.path = Path(run_dir) / METRICS_FILE
        self.wandb = None
        if not enabled:
            return
        Path(run_dir).mkdir(parents=True, exist_ok=True)
        truncate_after(self.path, resume_step)
        if cfg.backend == "wandb" and cfg.mode != "disabled":
            self.wandb = _start_wandb(run_dir, cfg, config_dict)

    def log(self, step: int, values: Dict[str, float]) -> None:
        if not self.enabled:
            return
        record = {"step": step, **{k: float(v) for k, v in values.items()}, "time": time.time()}
        atomic_files.append_line(self.path, json.dumps(strict_record(record), allow_nan=False))
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


NONFINITE_KEY = "nonfinite"
"""In a metrics record: the names of the values that were NaN/inf, written as null (JSON has no
NaN); read_metrics turns them back into NaN."""


def strict_record(record: Dict[str, float]) -> Dict:
    bad = sorted(k for k, v in record.items() if isinstance(v, float) and not math.isfinite(v))
    if not bad:
        return record
    return {**{k: None if k in bad else v for k, v in record.items()}, NONFINITE_KEY: bad}


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop records of steps that the checkpoint does not contain (they are redone),
    and a last line torn by a crash; the file is replaced atomically."""
    if not path.exists():
        return
    keep = [r for r in atomic_files.read_json_lines(path) if r.get("step", 0) <= step]
    atomic_files.write_text(path, "".join(json.dumps(r) + "\n" for r in keep))


def read_metrics(run_dir: str):
    path = Path(run_dir) / METRICS_FILE
    records = atomic_files.read_json_lines(path)
    for r in records:
        for k in r.pop(NONFINITE_KEY, []):
            r[k] = math.nan
    return records


WANDB_ID_FILE = "wandb_run_id"
"""In the run folder: the W&B run id, so a resumed or requeued job continues the same run."""


def _start_wandb(run_dir: str, cfg: LoggerConfig, config_dict: Optional[dict]):
    import wandb

    id_file = Path(run_dir) / WANDB_ID_FILE
    resuming = id_file.exists()
    # Our own id: wandb.util.generate_id is gone from recent W&B releases.
    run_id = id_file.read_text().strip() if resuming else secrets.token_hex(6)
    atomic_files.write_text(id_file, run_id)
    if config_dict is None:
        config_dict = _resolved_config(run_dir)
    os.environ.setdefault("WANDB_SILENT", "true")
    # The config goes in once, when the run starts; a resumed job may differ in what it is
    # allowed to (train_iters...) and W&B would refuse the changed values.
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or Path(run_dir).name,
                      group=cfg.group, tags=list(cfg.tags), mode=cfg.mode, dir=run_dir,
                      id=run_id, resume="allow", config=None if resuming else config_dict)


def _resolved_config(run_dir: str) -> Optional[dict]:
    """The config.yaml a stage writes into its run folder before training starts."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        return None
    import yaml

    return yaml.safe_load(path.read_text())
