"""Console progress: a rich bar on rank 0 with step, loss, tokens/s and ETA."""

from typing import Dict, Optional


class Progress:
    def __init__(self, total: int, start: int, enabled: bool, description: str = "train"):
        self.bar = None
        self.completed = start
        if not enabled:
            return
        from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress,
                                   TextColumn, TimeElapsedColumn, TimeRemainingColumn)

        self.bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(),
                                MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(),
                                TextColumn("{task.fields[info]}"), transient=False)
        self.task = self.bar.add_task(description, total=total, completed=start, info="")
        self.bar.start()

    def update(self, step: int, values: Optional[Dict[str, float]] = None) -> None:
        self.completed = step
        if self.bar is None:
            return
        info = "  ".join(f"{k} {v:.4g}" for k, v in (values or {}).items())
        self.bar.update(self.task, completed=step, info=info)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
