"""Where numbers go: metrics.jsonl (always), W&B (optional, offline by default), the console."""

import json
import os
import time
from pathlib import Path
from typing import Dict, Optional

from megatron_minitron.config.train import LoggerConfig

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
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.wandb is not None:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None


def truncate_after(path: Path, step: int) -> None:
    """On resume, drop records of steps that the checkpoint does not contain (they are redone)."""
    if not path.exists():
        return
    keep = [line for line in path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in keep))


def read_metrics(run_dir: str):
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _start_wandb(run_dir: str, cfg: LoggerConfig, config_dict: Optional[dict]):
    import wandb

    id_file = Path(run_dir) / "wandb_run_id"
    run_id = id_file.read_text().strip() if id_file.exists() else wandb.util.generate_id()
    id_file.write_text(run_id)
    os.environ.setdefault("WANDB_SILENT", "true")
    return wandb.init(project=cfg.project, entity=cfg.entity, name=cfg.name or Path(run_dir).name,
                      group=cfg.group, tags=list(cfg.tags), mode=cfg.mode, dir=run_dir,
                      id=run_id, resume="allow", config=config_dict)
