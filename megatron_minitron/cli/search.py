"""`minitron search [key=value ...]`: prune candidate architectures within search.param_budget
from the saved importance scores, distill each briefly from the teacher, rank them by
validation loss; writes RUN_DIR/search/ranking.{json,md} and prints the table."""

from typing import List

from megatron_minitron.cli.preflight import check
from megatron_minitron.config.loader import load_config, override_list


def main(overrides: List[str]) -> None:
    cfg = check("search", load_config(override_list(overrides)))
    from megatron_minitron.pipeline.search_runs import run_search
    from megatron_minitron.runtime.rank import global_rank, is_rank0
    from megatron_minitron.runtime.run_lock import hold_run_dir

    with hold_run_dir(cfg.run.dir, global_rank()):
        result = run_search(cfg)
    if is_rank0():
        best = result.best
        print(f"minitron search: best {best['name']} ({best['params']:,} parameters, "
              f"valid {cfg.search.metric} {best['val_loss']:.4f}); ranking in "
              f"{result.ranking_md}")

