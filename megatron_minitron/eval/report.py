"""`write_report(run_dir)`: run_dir/report.md with tables and PNG plots, readable without W&B.

Every section is optional: it appears when its input is in the run folder.

Inputs (paths relative to run_dir):
  summary.json          written by `minitron pipeline`:
                        {"rows": [{"name": "teacher", "params": 134515008, "loss": 2.91,
                                   "perplexity": 18.4, "tokens": 0, "path": "teacher/..."},
                                  {"name": "pruned", ...}, {"name": "distilled", ...}],
                         ...any other keys (ignored here)}
                        name: the model's role ("teacher", "pruned", "distilled", "iter1"...);
                        params: all parameters, embeddings included; loss/perplexity: held-out
                        LM loss (nats) and exp(loss), as eval/perplexity.py measures them;
                        tokens: training/distillation tokens spent producing this model
                        (0 for the teacher and a just-pruned model); path: where the artefact is.
                        Optional per row: "params_non_embedding" (int).
  search/ranking.json   written by `minitron search`: a JSON list (or {"rows": list}) of
                        candidates, [{"name": "h512_f1536_l24", "params": 61234567,
                        "val_loss": 3.12}, ...]; optional per row: "rank" (1 = best),
                        "chosen" (true for the kept candidate), "tokens" (distillation tokens
                        the ranking spent on it), "sizes" ({"hidden_size": 512, ...}).
  */metrics.jsonl       every stage folder's (and run_dir's own) training metrics
                        (training/metrics.py): one loss curve plot per stage.
  importance/scores.safetensors   importance scores (importance/scores.py): heatmaps of the
                        [num_layers, k] scores and bars of the per-layer scores.
  eval/eval.json        `minitron eval` results (eval/suite.py): perplexity and task tables.
  eval/eval_models.json  the pipeline's eval stage: {"models": {name: eval.json's dict}} for
                        teacher, pruned and distilled: one table with a column per model.
Plots are PNG files under run_dir/report/ (matplotlib, Agg backend).
"""

import json
import math
from pathlib import Path
from typing import Any, Dict, List, Optional

from megatron_minitron.eval.suite import EVAL_MODELS
from megatron_minitron.runtime import atomic_files

REPORT = "report.md"
PLOTS = "report"
SUMMARY = "summary.json"
RANKING = "search/ranking.json"
SCORES = "importance/scores.safetensors"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _fmt(v: Any) -> str:
    if isinstance(v, bool) or v is None:
        return "" if v is None else ("yes" if v else "")
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def _table(rows: List[Dict[str, Any]], columns: List[str]) -> List[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return lines + [""]


def _save(fig, folder: Path, name: str) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with atomic_files.replacing(folder / name) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    _plt().close(fig)
    return f"{PLOTS}/{name}"


def _read_json(path: Path) -> Optional[Any]:
    return json.loads(path.read_text()) if path.is_file() else None


def summary_section(run: Path) -> List[str]:
    data = _read_json(run / SUMMARY)
    if not data or not data.get("rows"):
        return []
    rows = data["rows"]
    cols = ["name", "params"] + (["params_non_embedding"] if any(
        "params_non_embedding" in r for r in rows) else []) + [
        "loss", "perplexity", "tokens", "path"]
    teacher = [f"Teacher: {data['teacher']}.", ""] if data.get("teacher") else []
    return ["## Summary", ""] + teacher + _table(rows, cols)


def loss_curves_section(run: Path, plots: Path) -> List[str]:
    from megatron_minitron.training.metrics import METRICS_FILE, read_metrics

    stages = [run] + sorted(p for p in run.iterdir() if p.is_dir())
    lines: List[str] = []
    plt = _plt()
    for stage in stages:
        if not (stage / METRICS_FILE).is_file():
            continue
        records = read_metrics(str(stage))
        keys = sorted({k for r in records for k in r if "loss" in k})
        if not keys:
            continue
        name = "run" if stage == run else stage.name
        fig, ax = plt.subplots(figsize=(7, 4))
        for k in keys:
            pts = [(r["step"], r[k]) for r in records if k in r]
            style = "o--" if k.startswith("valid_") else "-"
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=k)
        ax.set(xlabel="step", ylabel="loss (nats)", title=f"{name}: losses")
        ax.legend()
        lines += [f"### {name}", "", f"![{name} losses]({_save(fig, plots, f'loss_{name}.png')})",
                  ""]
    return ["## Loss curves", ""] + lines if lines else []


def importance_section(run: Path, plots: Path) -> List[str]:
    if not (run / SCORES).is_file():
        return []
    from megatron_minitron.importance.scores import load_scores

    tensors = {k: v.float() for k, v in load_scores(str(run / SCORES)).tensors.items()}
    plt = _plt()
    from matplotlib.ticker import MaxNLocator

    lines = ["## Importance", ""]
    grids = {k: v for k, v in tensors.items() if v.dim() == 2}
    if grids:
        fig, axes = plt.subplots(1, len(grids), figsize=(4.5 * len(grids), 4), squeeze=False)
        for ax, (k, v) in zip(axes[0], sorted(grids.items())):
            im = ax.imshow(v.numpy(), aspect="auto", interpolation="nearest", cmap="viridis")
            ax.set(title=k, xlabel="index", ylabel="layer (0-based)" if "per_norm" not in k
                   else "norm")
            ax.yaxis.set_major_locator(MaxNLocator(integer=True))
            fig.colorbar(im, ax=ax)
        lines += [f"![importance heatmaps]({_save(fig, plots, 'importance_heatmaps.png')})", ""]
    bars = {k: v for k, v in tensors.items() if v.dim() == 1 and k.startswith(("layers.",
                                                                              "blocks."))}
    if bars:
        fig, axes = plt.subplots(1, len(bars), figsize=(4.5 * len(bars), 3.5), squeeze=False)
        for ax, (k, v) in zip(axes[0], sorted(bars.items())):
            ax.bar(range(1, len(v) + 1), v.numpy())
            ax.set(title=k, xlabel="layer_number (first of block)", ylabel="score")
        lines += [f"![per-layer importance]({_save(fig, plots, 'importance_layers.png')})", ""]
    return lines if len(lines) > 2 else []


def _ranking_rows(run: Path) -> List[Dict[str, Any]]:
    data = _read_json(run / RANKING)
    rows = data.get("rows", []) if isinstance(data, dict) else (data or [])
    return sorted(rows, key=lambda r: r["val_loss"])


def ranking_section(run: Path, plots: Path) -> List[str]:
    rows = _ranking_rows(run)
    if not rows:
        return []
    cols = ["name", "params", "val_loss"] + [c for c in ("tokens", "chosen")
                                             if any(c in r for r in rows)]
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(rows) + 1.5))
    colors = ["tab:green" if r.get("chosen") else "tab:blue" for r in rows]
    ax.barh([r["name"] for r in rows][::-1], [r["val_loss"] for r in rows][::-1],
            color=colors[::-1])
    ax.set(xlabel="validation loss (nats)", title="search ranking (best on top)")
    return ["## Search ranking", ""] + _table(rows, cols) + [
        f"![search ranking]({_save(fig, plots, 'search_ranking.png')})", ""]


def params_loss_section(run: Path, plots: Path) -> List[str]:
    search = _ranking_rows(run)
    summary = (_read_json(run / SUMMARY) or {}).get("rows", [])
    summary = [r for r in summary if r.get("loss") is not None and r.get("params")]
    if not search and not summary:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    if search:
        ax.scatter([r["params"] for r in search], [r["val_loss"] for r in search],
                   label="search candidates (short distillation)", alpha=0.7)
    for r in summary:
        ax.scatter([r["params"]], [r["loss"]], marker="*", s=160, label=r["name"])
    ax.set(xlabel="parameters", ylabel="loss (nats)", title="parameters vs loss")
    ax.legend(fontsize=8)
    return ["## Parameters vs loss", "",
            f"![parameters vs loss]({_save(fig, plots, 'params_vs_loss.png')})", ""]


def _task_metrics(result: Dict[str, Any]) -> Dict[str, Any]:
    """(task, metric) -> value of one eval.json, leaving out stderr, counts and "N/A"."""
    return {(t, m): v for t, res in result.get("tasks", {}).items() for m, v in res.items()
            if not isinstance(v, str) and m != "sample_len" and "_stderr" not in m}


def comparison_section(run: Path) -> List[str]:
    """The teacher beside the students: every model's suite on the same sets and tasks."""
    data = _read_json(run / "eval" / EVAL_MODELS)
    models = (data or {}).get("models") or {}
    if not models:
        return []
    names = list(models)
    tokens = {r["name"]: r.get("tokens") for r in
              (_read_json(run / SUMMARY) or {}).get("rows", [])}
    head = [{"set": "parameters", **{n: models[n].get("params") for n in names}},
            {"set": "training tokens", **{n: tokens.get(n) for n in names}}]
    sets = sorted({s for m in models.values() for s in m.get("perplexity", {})})
    ppl = [{"set": f"{s} perplexity", **{n: models[n]["perplexity"].get(s, {}).get(
        "perplexity") for n in names}} for s in sets]
    metrics = [_task_metrics(models[n]) for n in names]
    keys = sorted({k for m in metrics for k in m})
    tasks = [{"set": f"{t} {m}", **{n: metrics[i].get((t, m)) for i, n in enumerate(names)}}
             for t, m in keys]
    return ["## Teacher and students on the same sets and tasks", "",
            "Training tokens: what each model cost beyond the teacher (importance passes, "
            "correction, distillation).", ""] + _table(head + ppl + tasks, ["set"] + names)


def eval_section(run: Path) -> List[str]:
    data = _read_json(run / "eval" / "eval.json")
    if not data:
        return []
    ppl = [{"set": k, **v} for k, v in data.get("perplexity", {}).items()]
    lines = ["## Evaluation", "", f"Checkpoint: `{data.get('checkpoint')}`", ""]
    lines += _table(ppl, ["set", "loss", "perplexity", "tokens"]) if ppl else []
    tasks = [{"task": t, "metric": m, "value": v} for (t, m), v in _task_metrics(data).items()]
    return lines + (_table(tasks, ["task", "metric", "value"]) if tasks else [])


def write_report(run_dir: str) -> Path:
    """Write run_dir/report.md (and run_dir/report/*.png); returns the report's path."""
    run = Path(run_dir)
    plots = run / PLOTS
    lines = [f"# Minitron run report: {run.name}", ""]
    body = (summary_section(run) + comparison_section(run) + eval_section(run)
            + loss_curves_section(run, plots) + importance_section(run, plots)
            + ranking_section(run, plots) + params_loss_section(run, plots))
    lines += body or ["Nothing to report yet: no summary, metrics, scores or ranking found.", ""]
    path = run / REPORT
    atomic_files.write_text(path, "\n".join(lines))
    return path
