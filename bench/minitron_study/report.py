"""RESULTS.md and results.json from the arm files alone: every number in them comes from a run,
arms without a finished run are listed as "not run" (or "failed", with the error)."""

import json
from pathlib import Path
from typing import Dict, List

from minitron_study.ablations import build_ablations
from minitron_study.claims import evaluate_claims, tokens_to_match
from minitron_study.config import StudyConfig
from minitron_study.plots import write_plots
from minitron_study.runner import arm_rows, done_arms, read_arm


def collect(study: StudyConfig) -> Dict:
    teacher = read_arm(Path(study.study_dir) / "teacher.json")
    ablations = [{"number": abl.number, "key": abl.key, "title": abl.title,
                  "question": abl.question, "arms": arm_rows(study, abl)}
                 for abl in build_ablations(study.sizes, teacher.get("depth_layers"))]
    done, reps = done_arms({a["number"]: a["arms"] for a in ablations})
    return {"budget": study.budget, "note": study.sizes.note, "study_dir": study.study_dir,
            "teacher": teacher, "seeds": 1 + len(study.sizes.seeds),
            "ablations": ablations, "claims": evaluate_claims(done, reps,
                                                              1 + len(study.sizes.seeds))}


def _num(v, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _table(abl: Dict) -> List[str]:
    lines = ["| arm | overrides | retraining | params (M) | loss after pruning | loss | "
             "perplexity | retraining tokens | compute seconds | status |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in abl["arms"]:
        ov = "<br>".join(f"`{o}`" for o in r["overrides"]) or "(base)"
        status = r["status"] if r["status"] != "failed" else f"failed: {r['error'][:120]}"
        params = None if r.get("params") is None else r["params"] / 1e6
        lines.append(f"| {r['arm']} | {ov} | {r['retrain']} | {_num(params, '.1f')} | "
                     f"{_num(r.get('pruned_loss'), '.3f')} | {_num(r.get('loss'), '.3f')} | "
                     f"{_num(r.get('perplexity'), '.1f')} | {_num(r.get('tokens'), ',')} | "
                     f"{_num(r.get('compute_seconds'), '.0f')} | {status} |")
    return lines


def _provenance(abl: Dict) -> List[str]:
    done = [r for r in abl["arms"] if r["status"] == "done"]
    if not done:
        return ["No arm of this ablation has run yet."]
    out = []
    for field in ("command", "commit", "machine"):
        vals = sorted({r[field] for r in done})
        out.append(f"- {field}: " + "; ".join(f"`{v}`" for v in vals))
    return out


def _scratch_note(abl: Dict) -> List[str]:
    arms = {r["arm"]: r for r in abl["arms"] if r["status"] == "done"}
    if "width" not in arms or "random_init" not in arms:
        return []
    kd, rnd = arms["width"], arms["random_init"]
    match = tokens_to_match(rnd, kd["loss"])
    curve = ", ".join(f"{c['tokens']:,}: {c['loss']:.3f}" for c in rnd["curve"])
    told = (f"first reached it at {match:,} tokens ({match / kd['tokens']:.1f}x)" if match
            else f"did not reach it within {rnd['tokens_trained']:,} tokens")
    return ["", f"The random_init row is a run of exactly the student's tokens. A longer run "
            f"({rnd['tokens_trained']:,} tokens) gave, by tokens seen: {curve}; its checkpoints "
            "are mid-schedule (the cosine decay spans the whole run), so they overstate the "
            "loss a run ending there would reach. The distilled student's loss is "
            f"{kd['loss']:.3f} after {kd['tokens']:,} tokens; random init {told}."]


def markdown(res: Dict) -> str:
    t = res["teacher"]
    lines = [f"# The Minitron study at small scale ({res['budget']} budget)", "",
             "Written by `bench/study.py` from the arm results under "
             f"`{res['study_dir']}/arms/`; do not edit below the marker line by hand. Loss is "
             "the mean next-token cross entropy (nats) on the same held-out validation batches "
             "for every model; lower is better. One seed per arm at first; ablation 10 reruns "
             "the default student with other seeds, and a claim that a change smaller than that "
             f"spread would reverse is rerun on {res['seeds']} seeds (every arm it compares, "
             "rows `<arm>_seed<n>`) and judged on each arm's mean over the seeds against the "
             "larger of those arms' seed ranges; it is within noise if the means still differ "
             "by less. "
             "Compute seconds: the recorded time of every stage an arm used (scoring, pruning, "
             "retraining, evaluation; the teacher's import excluded), whether it ran for this "
             "arm or was shared with another.", ""]
    lines += [f"This budget: {res['note']}.", ""]
    if t.get("status") == "done":
        label = f"{t['label']}; " if t.get("label") else ""
        lines += [f"Teacher: {label}{t['params'] / 1e6:.1f}M parameters, loss {t['loss']:.3f}, "
                  f"perplexity {t['perplexity']:.1f}.", ""]
    verdicts = [c["verdict"] for c in res["claims"]]
    lines += ["## Which of the papers' claims held here", "",
              f"{verdicts.count('held')} held, {verdicts.count('did not hold')} did not hold, "
              f"{verdicts.count('within noise')} within noise ({res['seeds']} seeds cannot "
              f"tell), {verdicts.count('not comparable')} not comparable (the compared arms "
              "differ in size), "
              f"{verdicts.count('not run')} not run (an arm they need, or its seed replicates, "
              "has no finished result). "
              "Each verdict is a rule evaluated on the numbers below "
              "(bench/minitron_study/claims.py). Margin: how far one compared loss (or mean "
              "over seeds) would have to move to reverse the verdict; seed spread: the range of "
              "the default student's loss over seeds (ablation 10), right after pruning or after "
              "retraining, whichever the claim compares, or for a claim judged over seeds the "
              "larger of its compared arms' ranges. A claim of equal losses (calibration "
              "stability) holds when they differ by no more than the seed spread; width and "
              "depth are compared only at total parameters within one layer of each other.", "",
              "| ablation | claim | verdict | evidence (loss) | margin | seed spread |",
              "|---|---|---|---|---|---|"]
    for c in res["claims"]:
        shown = c["verdict"]
        if shown == "within noise":
            shown += f" (leans {c['leaning']})"
        if c.get("seeds"):
            shown += f", {res['seeds']} seeds"
        lines.append(f"| {c['ablation']} | {c['claim']} | **{shown}** | {c['evidence']} | "
                     f"{_num(c['margin'], '.3f')} | {_num(c['spread'], '.3f')} |")
    lines += ["", "![loss after pruning](study_pruned.png)", "",
              "![loss after retraining](study_retrained.png)", ""]
    for abl in res["ablations"]:
        lines += [f"## {abl['number']}. {abl['title']}", "", abl["question"], ""]
        lines += _table(abl) + _scratch_note(abl) + [""] + _provenance(abl) + [""]
        if abl["key"] == "scratch":
            lines += ["![random init versus distilled](study_scratch.png)", ""]
    return "\n".join(lines) + "\n"


STUDY_MARKER = "<!-- study: generated by bench/study.py below this line -->"
"""RESULTS.md keeps everything above this line (hand-written sections, e.g. the distillation
defaults of issue 15) when the study rewrites the file; a file without it is written whole, the
marker at its top."""
KEPT_MARKER = "<!-- sections below are written by hand (with their commands); study.py keeps them -->"
"""RESULTS.md also keeps everything from this line on, after the generated text (sections whose
figures come from other benches)."""


def kept_head(path: Path) -> str:
    """The hand-written head of an existing RESULTS.md (up to STUDY_MARKER), or ""."""
    if not path.is_file():
        return ""
    text = path.read_text()
    at = text.find(STUDY_MARKER)
    return "" if at < 0 else text[:at]


def kept_tail(path: Path) -> str:
    """The hand-written tail of an existing RESULTS.md (from the first KEPT_MARKER after
    STUDY_MARKER), or ""."""
    if not path.is_file():
        return ""
    text = path.read_text()
    at = text.find(KEPT_MARKER, max(text.find(STUDY_MARKER), 0))
    return "" if at < 0 else "\n" + text[at:]


def write_report(study: StudyConfig, plots: bool = True) -> Path:
    """RESULTS.md and results.json; the plots too unless `plots` is false (after every arm the
    text only: drawing them costs about a second, more than a tiny arm)."""
    out = Path(study.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = collect(study)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    if plots:
        write_plots(res, out)
    path = out / "RESULTS.md"
    path.write_text(kept_head(path) + STUDY_MARKER + "\n\n" + markdown(res) + kept_tail(path))
    return path
