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


def run_study(study_dir, timeout=240):
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
    # equal parameters for width and depth (both half the non-embedding parameters)
    w, d = by["width_depth"]["width"], by["width_depth"]["depth"]
    assert abs(w["params_non_embedding"] / d["params_non_embedding"] - 1) < 0.05
    assert d["architecture"]["num_layers"] == 2 and w["architecture"]["num_layers"] == 4
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


def test_markdown_and_plots_are_written(tiny_study):
    study, _ = tiny_study
    md = (study / "docs" / "RESULTS.md").read_text()
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
    from minitron_study.report import KEPT_MARKER

    md = study / "docs" / "RESULTS.md"
    md.write_text(md.read_text() + f"\n{KEPT_MARKER}\n\n## Hand-written (issue 15)\nkept\n")
    ran = run_study(study)
    assert ran == ["study: ablation 5 arm groups"]
    assert md.read_text().count("## Hand-written (issue 15)\nkept") == 1
    after = json.loads(missing.read_text())
    assert after["loss"] == before["loss"]  # its shared checkpoint was reused, not retrained


def test_hand_written_tail_is_kept(tmp_path):
    from minitron_study.report import KEPT_MARKER, kept_tail

    md = tmp_path / "RESULTS.md"
    assert kept_tail(md) == ""
    md.write_text("# generated\n\nold numbers\n")
    assert kept_tail(md) == ""
    md.write_text(f"# generated\n\nold numbers\n{KEPT_MARKER}\n## Recipe\nrows\n")
    assert kept_tail(md) == f"\n{KEPT_MARKER}\n## Recipe\nrows\n"


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
    assert close["verdict"] == "within noise" and close["leaning"] == "held"
    assert abs(close["margin"] - 0.05) < 1e-9 and abs(close["spread"] - 0.10) < 1e-9
    assert kd_vs_ce(5.00, spread)["verdict"] == "held"  # margin 0.2 > spread
    assert kd_vs_ce(4.60, spread)["verdict"] == "did not hold"
    assert kd_vs_ce(4.85, {})["verdict"] == "held"  # no seed arms: no noise yardstick
    # claims on losses right after pruning meet the spread of the pruned losses
    pruned_spread = {"width": {"loss": 4.8, "pruned_loss": 7.0, "tokens": 30},
                     "seed2": {"loss": 4.9, "pruned_loss": 7.5, "tokens": 30}}
    done = {2: arms(activation=1.0, magnitude=1.2, random=3.0), 10: pruned_spread}
    right_after = next(c for c in evaluate_claims(done) if c["ablation"] == 2)
    assert right_after["verdict"] == "within noise" and right_after["spread"] == 0.5


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
