"""`minitron eval [key=value ...]`: loss and perplexity of a checkpoint on held-out splits and
texts, then lm-eval-harness tasks if eval.tasks is set; rank 0 writes eval.json."""

import json
import sys
from dataclasses import replace
from typing import List

from megatron_minitron.cli.preflight import check
from megatron_minitron.config.loader import load_config, override_list


def main(overrides: List[str]) -> None:
    cfg = check("eval", load_config(override_list(overrides)))
    from megatron_minitron.checkpoint.dist import read_header, verified
    from megatron_minitron.eval.suite import evaluate_run, write_eval_json
    from megatron_minitron.runtime.distributed import process_groups
    from megatron_minitron.runtime.run_lock import hold_run_dir
    from megatron_minitron.training.data_source import resolve_tokenizer

    checkpoint = cfg.eval_checkpoint  # preflight: one is set
    verified(checkpoint, "eval.checkpoint" if cfg.eval.checkpoint else "checkpoint.load",
             cfg.checkpoint.verify)
    header = read_header(checkpoint)
    cfg = replace(cfg, model=header.model)  # the checkpoint's architecture, checked vs layout
    output = cfg.eval_output
    with process_groups(cfg.parallel, cfg.runtime) as ctx, hold_run_dir(cfg.run.dir, ctx.rank):
        result = evaluate_run(cfg, checkpoint, resolve_tokenizer(cfg, header), ctx)
        if ctx.rank == 0:
            path = write_eval_json(result, output)
            print(json.dumps({"perplexity": result["perplexity"]}, indent=2))
            print(f"minitron eval: wrote {path}")


if __name__ == "__main__":
    from megatron_minitron.cli.errors import run_stage

    sys.exit(run_stage(main, sys.argv[1:]))
