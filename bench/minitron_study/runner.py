"""Run the study's arms in one process, one JSON per finished arm (arms/<ablation>/<arm>.json),
so a rerun skips finished arms; a failed arm is recorded as failed and retried next time."""

import dataclasses
import json
import time
import traceback
from pathlib import Path
from typing import Dict, List

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.checkpoint.smollm2 import teacher_label
from megatron_minitron.config.loader import load_config
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.pipeline.run import check_target, prune_config, round_budgets
from megatron_minitron.runtime.distributed import barrier, process_group_held
from minitron_study.ablations import Ablation, Arm, build_ablations
from minitron_study.artifacts import Artifacts
from minitron_study.config import StudyConfig
from minitron_study.provenance import provenance


def base_overrides(study: StudyConfig) -> List[str]:
    return [f"experiment=study_{study.budget}", f"run.dir={study.study_dir}",
            *study.overrides]


def arm_path(study: StudyConfig, abl: Ablation, arm: Arm) -> Path:
    return Path(study.study_dir) / "arms" / abl.key / f"{arm.name}.json"


def read_arm(path: Path) -> Dict:
    return json.loads(path.read_text()) if path.is_file() else {"status": "not run"}


def finished(record: Dict, arm: Arm) -> bool:
    """Done, and by the arm as defined now: an edited arm reruns instead of reporting stale
    numbers under its new definition."""
    return (record.get("status") == "done" and record.get("retrain") == arm.retrain
            and record.get("overrides") == list(arm.overrides))


def run_study(study: StudyConfig, on_progress=None) -> None:
    """Every arm of the selected ablations; `on_progress()` after each (the report)."""
    base = load_config(base_overrides(study))
    ablations = [a for a in build_ablations(study.sizes) if a.number in study.ablations]
    # prune-only ablations first: cheap, so an interrupted run has finished as many as it can
    ablations.sort(key=lambda a: any(arm.retrain != "none" for arm in a.arms))
    with process_group_held(base.runtime) as (rank, _):
        art = Artifacts(Path(study.study_dir) / "shared", rank)
        teacher = art.teacher(base)
        teacher_eval = art.evaluate(base, teacher)
        if rank == 0:
            _write(Path(study.study_dir) / "teacher.json",
                   {**teacher_eval, "status": "done", "label": teacher_label(base.pipeline.teacher),
                    **provenance()})
        for abl in ablations:
            for arm in abl.arms:
                path = arm_path(study, abl, arm)
                if finished(read_arm(path), arm):
                    continue
                if rank == 0:
                    print(f"study: ablation {abl.number} arm {arm.name}", flush=True)
                start, art.runner.seconds = time.time(), 0.0
                try:
                    cfg = load_config(base_overrides(study) + list(arm.overrides))
                    row = run_arm(art, cfg, teacher, arm, study, base.runtime.seed)
                    row.update(status="done", seconds=round(time.time() - start, 1),
                               compute_seconds=round(art.runner.seconds, 1))
                except Exception as e:  # one broken arm must not cost the others their run
                    row = {"status": "failed", "error": f"{type(e).__name__}: {e}",
                           "traceback": traceback.format_exc()[-2000:]}
                    print(f"study: arm {abl.key}/{arm.name} failed: {row['error']}", flush=True)
                if rank == 0:
                    _write(path, {"ablation": abl.number, "arm": arm.name,
                                  "overrides": list(arm.overrides), "retrain": arm.retrain,
                                  **row, **provenance()})
                barrier()
                if on_progress and rank == 0:
                    on_progress()


def run_arm(art: Artifacts, cfg: MinitronConfig, teacher: str, arm: Arm,
            study: StudyConfig, eval_seed: int) -> Dict:
    """Prune (in pipeline.iterations rounds, as `minitron pipeline` does), retrain, evaluate.
    Every arm is evaluated on the held-out batches that `eval_seed` (the base config's seed)
    picks, also an arm that trains with another runtime.seed."""
    held_out = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, seed=eval_seed))
    budgets = round_budgets(cfg, teacher)
    check_target(cfg, teacher, budgets[-1])
    iters = cfg.pipeline.distill_iters // len(budgets)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
    student, calib, tokens = teacher, 0, 0
    for budget in budgets:
        rcfg = prune_config(cfg, budget)
        scores = art.scores(rcfg, student)
        calib += scores["tokens"]
        pruned = art.pruned(rcfg, student, scores["scores"])
        student = pruned
        if arm.retrain == "kd":
            student = art.distilled(rcfg, teacher, pruned, iters)["checkpoint"]
            tokens += iters * tokens_per_step
        elif arm.retrain == "ce":
            student = art.cross_entropy(rcfg, pruned, iters)["checkpoint"]
            tokens += iters * tokens_per_step
    model = ckpt.read_header(pruned).model
    after_prune = art.evaluate(held_out, pruned)
    row = {"params": model.num_parameters(),
           "params_non_embedding": model.num_parameters(include_embeddings=False),
           "architecture": {k: getattr(model, k) for k in (
               "num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
               "num_query_groups")},
           "pruned_loss": after_prune["loss"], "pruned_perplexity": after_prune["perplexity"],
           "calibration_tokens": calib}
    if arm.retrain == "scratch":
        # one run of exactly the student's tokens (its schedule complete), one long run whose
        # mid-schedule checkpoints give the tokens the random-init model needs to match
        n, s = cfg.pipeline.distill_iters, study.sizes
        equal = art.scratch(cfg, teacher, pruned, n, n)[-1]
        long = art.scratch(cfg, teacher, pruned, n * s.scratch_factor,
                           max(n * s.scratch_factor // s.scratch_points, 1))
        curve = [dict(tokens=c["tokens"], **_loss(art.evaluate(held_out, c["checkpoint"])))
                 for c in long]
        row.update(_loss(art.evaluate(held_out, equal["checkpoint"])), tokens=equal["tokens"],
                   curve=curve, tokens_trained=curve[-1]["tokens"])
    else:
        final = art.evaluate(held_out, student) if arm.retrain != "none" else after_prune
        row.update(_loss(final), tokens=tokens)
    return row


def _loss(r: Dict) -> Dict:
    return {"loss": r["loss"], "perplexity": r["perplexity"]}


def _write(path: Path, record: Dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(path)
