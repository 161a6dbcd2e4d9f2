"""`python3 bench/study.py budget=tiny`: every ablation yields its rows, the report and the raw
numbers are written from them, a rerun skips finished arms; the claim rules read the numbers."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from cli_process import child_env

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))  # the study is experiment code: bench/minitron_study


def run_study(study_dir, timeout=480):  # a guard against a hang, not a time limit
    p = subprocess.run([sys.executable, str(REPO / "bench" / "study.py"), "budget=tiny",
                        f"dir={study_dir}"], capture_output=True, text=True, env=child_env(),
                       timeout=timeout, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    return [line for line in p.stdout.splitlines() if line.startswith("study: ablation")]


@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    study = tmp_path_factory.mktemp("study")
    ran = run_study(study)
    return study, ran


def test_every_ablation_produces_its_rows(tiny_study):
    study, ran = tiny_study
    res = json.loads((study / "docs" / "results.json").read_text())
    assert [a["number"] for a in res["ablations"]] == list(range(1, 11))
    arms = sum(len(a["arms"]) for a in res["ablations"])
    assert len(ran) == arms  # the first run ran every arm once
    for abl in res["ablations"]:
        assert len(abl["arms"]) >= 2, abl["key"]  # a comparison needs two sides
        for row in abl["arms"]:
            assert row["status"] == "done", (abl["key"], row.get("error"))
            assert row["loss"] > 0 and row["pruned_loss"] > 0 and row["params"] > 0
            assert row["commit"] and row["machine"] and "budget=tiny" in row["command"]
    by = {a["key"]: {r["arm"]: r for r in a["arms"]} for a in res["ablations"]}
    # equal retraining tokens within a comparison; none after pruning only
    assert len({r["tokens"] for r in by["retraining"].values()}) == 1
    assert by["iterative"]["iterative"]["tokens"] == by["iterative"]["one_shot"]["tokens"] > 0
    assert all(r["tokens"] == 0 for r in by["aggregation"].values())
    # width and depth at equal total parameters (embeddings included), within one layer
    w, d = by["width_depth"]["width"], by["width_depth"]["depth"]
    assert abs(w["params"] - d["params"]) <= d["layer_params"]
    assert d["architecture"]["num_layers"] == res["teacher"]["depth_layers"] == 2
    assert w["architecture"]["num_layers"] == 4
    # the iterative arm ends at exactly the one-shot architecture
    it, one = by["iterative"]["iterative"], by["iterative"]["one_shot"]
    assert it["architecture"] == one["architecture"] and it["params"] == one["params"]
    # shared work: the default student of ablations 2, 3 and 6 is the same model
    assert by["source"]["activation"]["loss"] == by["width_depth"]["width"]["loss"] \
        == by["retraining"]["kd"]["loss"]
    # random init: a curve of checkpoints longer than the distillation
    rnd = by["scratch"]["random_init"]
    assert rnd["tokens_trained"] > rnd["tokens"] == by["scratch"]["width"]["tokens"]
    assert len(rnd["curve"]) == 2  # tiny: scratch_points
    # the seed arms: the default student (shared) and a rerun of it under another seed
    seeds = by["seeds"]
    assert seeds["width"]["loss"] == by["retraining"]["kd"]["loss"]
    assert seeds["seed2"]["tokens"] == seeds["width"]["tokens"]
    assert seeds["seed2"]["overrides"] == ["runtime.seed=2"]
    assert {c["verdict"] for c in res["claims"]} <= {"held", "did not hold", "within noise"}
    assert all(c["spread"] is not None for c in res["claims"] if c["margin"] is not None)
    # the second pass: every arm of a claim within noise on one seed ran under seed 2, and the
    # claim was judged on both seeds (tiny: one extra seed)
    within = [c for c in res["claims"] if c["replicate"]]
    assert within  # tiny's 2 distillation steps leave several claims inside the seed spread
    for c in within:
        abl = next(a for a in res["ablations"] if a["number"] == c["ablation"])
        reps = {r["replicate_of"] for r in abl["arms"] if r.get("replicate_of")}
        assert set(c["replicate"]) <= reps, c["claim"]
        assert all(len(v) == 2 for v in c["seeds"].values()), c["claim"]
    reps = [r for a in res["ablations"] for r in a["arms"] if r.get("replicate_of")]
    assert all(r["overrides"][-1] == "runtime.seed=2" and r["seed"] == 2 for r in reps)


def test_markdown_and_plots_are_written(tiny_study):
    study, _ = tiny_study
    from minitron_study.report import STUDY_MARKER

    md = (study / "docs" / "RESULTS.md").read_text()
    assert md.startswith(STUDY_MARKER + "\n")  # no file before: written whole, marker on top
    for n in range(1, 11):
        assert f"\n## {n}. " in md
    assert "## Which of the papers' claims held here" in md and "- commit: `" in md
    assert "- machine: `" in md and "torch " in md
    for png in ("study_pruned.png", "study_retrained.png", "study_scratch.png"):
        assert (study / "docs" / png).stat().st_size > 1000


def test_rerun_skips_finished_arms_and_redoes_a_missing_one(tiny_study):
    study, _ = tiny_study
    missing = study / "arms" / "heads" / "groups.json"
    before = json.loads(missing.read_text())
    missing.unlink()
    from minitron_study.report import KEPT_MARKER, STUDY_MARKER

    md = study / "docs" / "RESULTS.md"
    head = "# Results\n\n## Distillation defaults chosen from measurements\nby hand\n\n"
    md.write_text(head + md.read_text().replace("## 1. ", "## 1. stale ")
                  + f"\n{KEPT_MARKER}\n\n## Hand-written (issue 15)\nkept\n")
    ran = run_study(study)
    assert ran == ["study: ablation 5 arm groups"]
    text = md.read_text()
    assert text.startswith(head + STUDY_MARKER + "\n") and text.count(STUDY_MARKER) == 1
    assert "## 1. stale" not in text and "\n## 1. " in text  # below the marker: rewritten
    assert text.count("## Hand-written (issue 15)\nkept") == 1
    after = json.loads(missing.read_text())
    assert after["loss"] == before["loss"]  # its shared checkpoint was reused, not retrained


def test_hand_written_head_and_tail_are_kept(tmp_path):
    from minitron_study.report import KEPT_MARKER, STUDY_MARKER, kept_head, kept_tail

    md = tmp_path / "RESULTS.md"
    assert kept_tail(md) == "" and kept_head(md) == ""
    md.write_text("# generated\n\nold numbers\n")
    assert kept_tail(md) == "" and kept_head(md) == ""  # no marker: the file is written whole
    md.write_text(f"# generated\n\nold numbers\n{KEPT_MARKER}\n## Recipe\nrows\n")
    assert kept_tail(md) == f"\n{KEPT_MARKER}\n## Recipe\nrows\n"
    # a KEPT_MARKER quoted in the hand-written head does not start the tail
    head = f"# Results\n\n## Defaults\nsee `{KEPT_MARKER}`\n\n"
    md.write_text(f"{head}{STUDY_MARKER}\n\n# generated\nold\n{KEPT_MARKER}\n## Recipe\n")
    assert kept_head(md) == head
    assert kept_tail(md) == f"\n{KEPT_MARKER}\n## Recipe\n"


def test_claims_follow_the_numbers_and_say_not_run():
    from minitron_study.claims import evaluate_claims, tokens_to_match

    def arms(**losses):
        return {k: {"loss": v, "pruned_loss": v} for k, v in losses.items()}

    held = evaluate_claims({2: arms(activation=1.0, magnitude=2.0, random=3.0)})
    source = [c for c in held if c["ablation"] == 2]
    assert [c["verdict"] for c in source] == ["held", "held"]
    flipped = evaluate_claims({2: arms(activation=2.0, magnitude=1.0, random=3.0)})
    assert [c["verdict"] for c in flipped if c["ablation"] == 2] == ["did not hold"] * 2
    assert all(c["verdict"] == "not run" for c in held if c["ablation"] != 2)
    scratch = {"tokens": 5, "loss": 6.0,
               "curve": [{"tokens": 10, "loss": 5.0}, {"tokens": 20, "loss": 3.0}]}
    assert tokens_to_match(scratch, 3.5) == 20 and tokens_to_match(scratch, 2.0) is None
    assert tokens_to_match(scratch, 6.0) == 5  # the equal-token run already matches


def test_a_margin_inside_the_seed_spread_is_within_noise():
    from minitron_study.claims import evaluate_claims, reversal_margin

    assert reversal_margin([1.0, 2.0, 3.5]) == 1.0  # held: the smallest step
    assert reversal_margin([2.0, 1.0, 3.0]) == 1.0  # not held: the violated step
    assert reversal_margin([3.0, 2.5, 1.0]) == 1.5  # every violation must be undone
    assert reversal_margin([1.0, 1.0], strict=False) == 0.0

    def arms(tokens=30, **losses):
        return {k: {"loss": v, "pruned_loss": v + 2, "tokens": tokens} for k, v in losses.items()}

    def kd_vs_ce(ce, seeds):
        done = {6: arms(kd=4.80, ce=ce), 10: seeds}
        return next(c for c in evaluate_claims(done) if c["claim"].startswith("Logit KD beats"))

    spread = arms(width=4.80, seed2=4.90, seed3=4.85)  # retrained spread 0.10
    close = kd_vs_ce(4.85, spread)
    # within noise on one seed: no verdict until its arms have run under the other seeds
    assert close["verdict"] == "not run" and close["leaning"] == "held"
    assert close["replicate"] == ["kd", "ce"] and "within noise" in close["evidence"]
    assert abs(close["margin"] - 0.05) < 1e-9 and abs(close["spread"] - 0.10) < 1e-9
    assert kd_vs_ce(5.00, spread)["verdict"] == "held"  # margin 0.2 > spread
    assert kd_vs_ce(5.00, spread)["replicate"] == []
    assert kd_vs_ce(4.60, spread)["verdict"] == "did not hold"
    assert kd_vs_ce(4.85, {})["verdict"] == "held"  # no seed arms: no noise yardstick
    # claims on losses right after pruning meet the spread of the pruned losses
    pruned_spread = {"width": {"loss": 4.8, "pruned_loss": 7.0, "tokens": 30},
                     "seed2": {"loss": 4.9, "pruned_loss": 7.5, "tokens": 30}}
    done = {2: arms(activation=1.0, magnitude=1.2, random=3.0), 10: pruned_spread}
    right_after = next(c for c in evaluate_claims(done) if c["ablation"] == 2)
    assert right_after["verdict"] == "not run" and right_after["spread"] == 0.5
    assert right_after["replicate"] == ["activation", "magnitude", "random"]


def _rec(loss, pruned=None, tokens=30):
    return {"loss": loss, "pruned_loss": loss + 2 if pruned is None else pruned,
            "tokens": tokens}


def test_a_claim_within_noise_is_judged_on_the_means_over_seeds():
    from minitron_study.claims import evaluate_claims

    seeds10 = {"width": _rec(4.80), "seed2": _rec(4.90), "seed3": _rec(4.85)}  # spread 0.10
    done = {6: {"kd": _rec(4.80), "ce": _rec(4.85)}, 10: seeds10}

    def kd_vs_ce(kd, ce):
        reps = {6: {"kd": [_rec(v) for v in kd], "ce": [_rec(v) for v in ce]}}
        return next(c for c in evaluate_claims(done, reps, seeds=3)
                    if c["claim"].startswith("Logit KD beats"))

    # means kd 4.80, ce 4.92: margin 0.12 > the larger seed range (ce: 0.11) -> held
    held = kd_vs_ce([4.81, 4.79], [4.95, 4.96])
    assert held["verdict"] == "held" and abs(held["margin"] - 0.12) < 1e-9
    assert abs(held["spread"] - 0.11) < 1e-9
    assert held["seeds"] == {"kd": [4.80, 4.81, 4.79], "ce": [4.85, 4.95, 4.96]}
    assert "means over 3 seeds" in held["evidence"] and "4.850 / 4.950 / 4.960" in held["evidence"]
    # means kd 4.933, ce 4.717 reverse the one-seed order by more than either range (0.2)
    assert kd_vs_ce([5.0, 5.0], [4.65, 4.65])["verdict"] == "did not hold"
    # kd's own range (0.25) covers the gap of the means (0.05) -> within noise, after 3 seeds
    noisy = kd_vs_ce([4.95, 4.70], [4.85, 4.90])
    assert noisy["verdict"] == "within noise" and abs(noisy["spread"] - 0.25) < 1e-9
    # a missing replicate: no verdict yet
    assert kd_vs_ce([4.81], [4.95, 4.96])["verdict"] == "not run"


def test_replicates_are_selected_for_the_arms_of_claims_within_noise():
    from minitron_study.ablations import build_ablations
    from minitron_study.config import StudyConfig
    from minitron_study.runner import needed_replicates

    study = StudyConfig(budget="quick")
    ablations = build_ablations(study.sizes, 12)
    claims = [{"ablation": 6, "replicate": ["kd", "ce"]}, {"ablation": 6, "replicate": []},
              {"ablation": 6, "replicate": ["kd", "kd_t2"]},
              {"ablation": 3, "replicate": ["width", "depth"]}]
    picked = needed_replicates(study, ablations, claims)
    names = [(abl.number, arm.name) for abl, arm in picked]
    assert names == [(6, "kd_seed2"), (6, "kd_seed3"), (6, "ce_seed2"), (6, "ce_seed3"),
                     (6, "kd_t2_seed2"), (6, "kd_t2_seed3"), (3, "width_seed2"),
                     (3, "width_seed3"), (3, "depth_seed2"), (3, "depth_seed3")]
    depth = {arm.name: arm for _, arm in picked}["depth_seed3"]
    assert depth.overrides[0] == "prune.target.num_layers=12"
    assert depth.overrides[-1] == "runtime.seed=3" and depth.retrain == "kd"
    # only the selected ablations get their replicates
    only6 = [a for a in ablations if a.number == 6]
    assert {abl.number for abl, _ in needed_replicates(study, only6, claims)} == {6}


def test_calibration_stability_is_judged_against_the_seed_spread():
    from minitron_study.claims import evaluate_claims

    def stable(seeds):
        cal = {"n16": _rec(7.0, 6.995), "n64": _rec(7.1, 7.093), "n256": _rec(7.0, 7.049)}
        return [c for c in evaluate_claims({9: cal, 10: seeds}) if c["ablation"] == 9][-1]

    # the two largest sizes differ by 0.044 nats (within the old 1% tolerance)
    narrow = stable({"width": _rec(4.8, 7.00), "seed2": _rec(4.8, 7.04)})  # spread 0.04
    assert narrow["verdict"] == "did not hold" and abs(narrow["spread"] - 0.04) < 1e-9
    wide = stable({"width": _rec(4.8, 7.00), "seed2": _rec(4.8, 7.05)})  # spread 0.05
    assert wide["verdict"] == "held" and abs(wide["margin"] - 0.006) < 1e-9
    assert stable({})["verdict"] == "not run"  # no seed spread: nothing to judge it against


def test_width_and_depth_compare_at_equal_total_parameters():
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.pipeline.run import final_model, round_configs
    from minitron_study.ablations import build_ablations, equal_total_layers
    from minitron_study.claims import evaluate_claims
    from minitron_study.config import SIZES

    cfg = load_config(["model=smollm2_135m", "pipeline.param_fraction=0.5"])
    teacher = cfg.model
    width = final_model(teacher, round_configs(cfg, teacher))
    assert round(width.num_parameters() / 1e5) == 711  # 71.1M
    layers = equal_total_layers(teacher, width.num_parameters())
    assert layers == 12  # 28.3M tied embeddings + 12 x 3.54M = 70.8M, not half the layers
    abl3, abl4 = (a for a in build_ablations(SIZES["quick"], layers) if a.number in (3, 4))
    depth = next(a for a in abl3.arms if a.name == "depth")
    assert depth.overrides[0] == "prune.target.num_layers=12"
    assert all(a.overrides[0] == "prune.target.num_layers=15" for a in abl4.arms)
    # the depth arm shares ablation 4's scores file: the same importance overrides
    assert depth.overrides[1:] == next(a for a in abl4.arms if a.name == "loss").overrides[1:]

    def claims(depth_params):
        arms = {"width": {**_rec(4.85, 7.09), "params": 71_095_374},
                "depth": {**_rec(4.74, 6.58), "params": depth_params, "layer_params": 3_540_096}}
        return [c for c in evaluate_claims({3: arms}) if c["ablation"] == 3]

    equal = claims(70_793_280)
    assert [c["verdict"] for c in equal] == ["did not hold", "did not hold"]
    assert "width 71.1M, depth 70.8M" in equal[0]["evidence"]
    unequal = claims(81_413_568)  # half the layers: 10.3M more than the width arm
    assert [c["verdict"] for c in unequal] == ["not comparable"] * 2
    assert "more than one layer" in unequal[0]["evidence"]


def test_an_arm_finished_under_another_definition_reruns():
    from minitron_study.ablations import Arm
    from minitron_study.runner import finished

    arm = Arm("heads", ("prune.head_mode=heads",), "kd")
    rec = {"status": "done", "overrides": ["prune.head_mode=heads"], "retrain": "kd"}
    assert finished(rec, arm)
    assert not finished({**rec, "retrain": "none"}, arm)
    assert not finished({**rec, "overrides": []}, arm)
    assert not finished({**rec, "status": "failed"}, arm)


@pytest.mark.parametrize("budget", ["tiny", "quick", "full"])
def test_every_arm_of_every_budget_composes(budget):
    from megatron_minitron.config.loader import load_config
    from minitron_study.ablations import RETRAIN, build_ablations
    from minitron_study.config import StudyConfig
    from minitron_study.runner import base_overrides

    study = StudyConfig(budget=budget)
    ablations = build_ablations(study.sizes)
    assert [a.number for a in ablations] == list(range(1, 11))
    for abl in ablations:
        assert len({a.name for a in abl.arms}) == len(abl.arms), abl.key
        for arm in abl.arms:
            assert arm.retrain in RETRAIN
            cfg = load_config(base_overrides(study) + list(arm.overrides))
            assert cfg.pipeline.export is False  # the study never needs an HF export
