"""The study's figures: loss after pruning and after retraining per ablation, and the random-init
curve against the distilled student."""

from pathlib import Path
from typing import Dict


def _bars(res: Dict, field: str, title: str, path: Path) -> None:
    import matplotlib.pyplot as plt

    groups = [(a, [r for r in a["arms"] if r["status"] == "done" and r.get(field) is not None
                   and (field == "pruned_loss" or r["retrain"] != "none")
                   and not r.get("replicate_of")])  # one bar per arm: its first seed
              for a in res["ablations"]]
    groups = [(a, rows) for a, rows in groups if rows]
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(3.2 * max(len(groups), 1), 3.6),
                             squeeze=False)
    for ax, (abl, rows) in zip(axes[0], groups):
        ax.bar(range(len(rows)), [r[field] for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), [r["arm"] for r in rows], rotation=60, ha="right",
                      fontsize=7)
        lo = min(r[field] for r in rows)
        ax.set_ylim(lo * 0.95, max(r[field] for r in rows) * 1.02)  # differences, not zero
        ax.set_title(f"{abl['number']}. {abl['key']}", fontsize=8)
    teacher = res["teacher"].get("loss")
    fig.suptitle(title + (f" (teacher {teacher:.3f})" if teacher else ""), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _scratch(res: Dict, path: Path) -> None:
    import matplotlib.pyplot as plt

    abl = next(a for a in res["ablations"] if a["key"] == "scratch")
    arms = {r["arm"]: r for r in abl["arms"] if r["status"] == "done"}
    fig, ax = plt.subplots(figsize=(5, 3.5))
    if "random_init" in arms:
        r = arms["random_init"]
        ax.plot([p["tokens"] for p in r["curve"]], [p["loss"] for p in r["curve"]], "o-",
                label="random init, long run")
        ax.plot([r["tokens"]], [r["loss"]], "s", color="tab:red",
                label="random init, equal tokens")
    if "width" in arms:
        kd = arms["width"]
        ax.axhline(kd["loss"], color="tab:green", ls="--", label="pruned + distilled")
        ax.axvline(kd["tokens"], color="gray", ls=":", lw=1)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("held-out loss (nats)")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_plots(res: Dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on CPU boxes and CI
    _bars(res, "pruned_loss", "Held-out loss right after pruning", out / "study_pruned.png")
    _bars(res, "loss", "Held-out loss after retraining", out / "study_retrained.png")
    _scratch(res, out / "study_scratch.png")
