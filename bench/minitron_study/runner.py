"""Run the study's arms in one process, one JSON per finished arm (arms/<ablation>/<arm>.json),
so a rerun skips finished arms; a failed arm is recorded as failed and retried next time.

Two passes: every arm of the selected ablations, then the seed replicates (arms/<ablation>/
<arm>_seed<n>.json) of the arms compared by a claim that one seed left within noise, so that
claim is judged over seeds (claims.py). Both passes skip what has run."""

import dataclasses
import json
import time
import traceback
from pathlib import Path
from typing import Dict, List, Tuple

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.checkpoint.embedded import teacher_label
from megatron_minitron.config.loader import load_config
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.pipeline.run import final_model, round_configs
from megatron_minitron.pruning.budget import count
from megatron_minitron.runtime.distributed import barrier, process_group_held
from minitron_study.ablations import (Ablation, Arm, build_ablations, equal_total_layers,
                                      replicate)
from minitron_study.artifacts import Artifacts
from minitron_study.claims import Arms, Replicates, evaluate_claims
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
            and record.get("overrides") == list(arm.overrides)
            and record.get("revision", 0) == arm.revision)


def arm_rows(study: StudyConfig, abl: Ablation) -> List[Dict]:
    """Every arm of `abl` as its record (finished earlier counts, selected now or not; a result
    from an older definition reads "not run"), then the finished seed replicates of its arms
    (marked replicate_of and seed)."""
    rows = []
    for a in abl.arms:
        rec = read_arm(arm_path(study, abl, a))
        if rec["status"] == "done" and not finished(rec, a):
            rec = {"status": "not run (its result is from an older definition)"}
        rows.append({**rec, "arm": a.name, "overrides": list(a.overrides), "retrain": a.retrain})
    for a in abl.arms:
        for seed in study.sizes.seeds:
            rep = replicate(a, seed)
            rec = read_arm(arm_path(study, abl, rep))
            if finished(rec, rep):
                rows.append({**rec, "arm": rep.name, "replicate_of": a.name, "seed": seed})
    return rows


def done_arms(rows: Dict[int, List[Dict]]) -> Tuple[Dict[int, Arms], Replicates]:
    """From arm_rows by ablation: the finished arms, and the finished replicates by arm."""
    done, reps = {}, {}
    for number, rs in rows.items():
        done[number] = {r["arm"]: r for r in rs
                        if r["status"] == "done" and not r.get("replicate_of")}
        for r in rs:
            if r.get("replicate_of"):
                reps.setdefault(number, {}).setdefault(r["replicate_of"], []).append(r)
    return done, reps


def needed_replicates(study: StudyConfig, ablations: List[Ablation],
                      claims: List[Dict]) -> List[Tuple[Ablation, Arm]]:
    """The seed replicates (every seed of the budget) of each arm that a claim of the selected
    `ablations` compares and left within noise on one seed, in claim order, each once."""
    by = {a.number: a for a in ablations}
    out: List[Tuple[Ablation, Arm]] = []
    for c in claims:
        abl = by.get(c["ablation"])
        for name in c["replicate"] if abl else []:
            arm = next(a for a in abl.arms if a.name == name)
            out += [(abl, rep) for rep in (replicate(arm, s) for s in study.sizes.seeds)
                    if (abl, rep) not in out]
    return out


def run_study(study: StudyConfig, on_progress=None) -> None:
    """Every arm of the selected ablations, then the seed replicates their claims need;
    `on_progress()` after each (the report)."""
    base = load_config(base_overrides(study))
    with process_group_held(base.runtime) as (rank, _):
        art = Artifacts(Path(study.study_dir) / "shared", rank)
        teacher = art.teacher(base)
        teacher_eval = art.evaluate(base, teacher)
        model = ckpt.read_header(teacher).model
        width = final_model(model, round_configs(base, model))
        depth = None if width is None else equal_total_layers(model, width.num_parameters())
        if rank == 0:
            _write(Path(study.study_dir) / "teacher.json",
                   {**teacher_eval, "status": "done", "label": teacher_label(base.pipeline.teacher),
                    "width_params": None if width is None else width.num_parameters(),
                    "depth_layers": depth, **provenance()})
        every = build_ablations(study.sizes, depth)
        ablations = [a for a in every if a.number in study.ablations]
        # prune-only ablations first: cheap, so an interrupted run has finished as many as it can
        ablations.sort(key=lambda a: any(arm.retrain != "none" for arm in a.arms))
        def run(abl: Ablation, arm: Arm) -> None:
            _run_once(art, study, abl, arm, teacher, base, rank, on_progress)

        for abl in ablations:
            for arm in abl.arms:
                run(abl, arm)
        # second pass: the seed replicates of the claims that one seed left within noise
        done, reps = done_arms({a.number: arm_rows(study, a) for a in every})
        claims = evaluate_claims(done, reps, 1 + len(study.sizes.seeds))
        todo = [(abl, arm) for abl, arm in needed_replicates(study, ablations, claims)
                if not finished(read_arm(arm_path(study, abl, arm)), arm)]
        if todo and rank == 0:
            print(f"study: second pass: {len(todo)} seed replicates for the claims within "
                  "noise", flush=True)
        for abl, arm in todo:
            run(abl, arm)


def _run_once(art: Artifacts, study: StudyConfig, abl: Ablation, arm: Arm, teacher: str,
              base: MinitronConfig, rank: int, on_progress) -> None:
    """One arm, unless it has finished under its current definition; its JSON either way."""
    path = arm_path(study, abl, arm)
    if finished(read_arm(path), arm):
        return
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
        _write(path, {"ablation": abl.number, "arm": arm.name, "overrides": list(arm.overrides),
                      "retrain": arm.retrain, "revision": arm.revision, **row, **provenance()})
    barrier()
    if on_progress and rank == 0:
        on_progress()


def run_arm(art: Artifacts, cfg: MinitronConfig, teacher: str, arm: Arm,
            study: StudyConfig, eval_seed: int) -> Dict:
    """Prune (in pipeline.iterations rounds, as `minitron pipeline` does: the last one to the
    one-shot architecture), retrain, evaluate. Every arm is evaluated on the held-out batches
    that `eval_seed` (the base config's seed) picks, also an arm that trains with another
    runtime.seed."""
    held_out = dataclasses.replace(cfg, runtime=dataclasses.replace(cfg.runtime, seed=eval_seed))
    source = ckpt.read_header(teacher).model
    rounds = round_configs(cfg, source)
    final_model(source, rounds)  # an impossible target fails before any work
    iters = cfg.pipeline.distill_iters // len(rounds)
    tokens_per_step = cfg.train.global_batch_size * cfg.data.seq_length
    student, calib, tokens = teacher, 0, 0
    for rcfg in rounds:
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
           # one transformer layer of this architecture (width vs depth: the comparability unit)
           "layer_params": count(model, {"num_layers": 2}, False) - count(model, {"num_layers": 1},
                                                                         False),
           "seed": cfg.runtime.seed,
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
