"""`minitron pipeline experiment=smoke`: every artefact, resume after a kill, force, errors."""

import json
import signal
import time
from pathlib import Path

import pytest

from cli_process import losses, minitron


def run_pipeline(run_dir, *extra, timeout=300):
    p = minitron("pipeline", "experiment=smoke", f"run.dir={run_dir}", *extra)
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    run = tmp_path_factory.mktemp("smoke")
    out = run_pipeline(run)
    return run, out


def test_smoke_pipeline_writes_every_artefact(smoke):
    from megatron_minitron.checkpoint.dist import read_header
    from megatron_minitron.importance.scores import load_scores

    run, out = smoke
    summary = json.loads((run / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["rows"]}
    assert set(rows) == {"teacher", "pruned", "distilled"}
    # The target: about half the teacher's non-embedding parameters.
    teacher, student = (read_header(rows[n]["path"]).model for n in ("teacher", "distilled"))
    ratio = student.num_parameters(False) / teacher.num_parameters(False)
    assert 0.4 < ratio <= 0.5
    assert rows["pruned"]["params"] == rows["distilled"]["params"] < rows["teacher"]["params"]
    # Distillation recovers part of what pruning lost.
    assert rows["distilled"]["loss"] < rows["pruned"]["loss"]
    assert rows["teacher"]["loss"] < rows["pruned"]["loss"]
    assert rows["distilled"]["tokens"] > rows["pruned"]["tokens"] > rows["teacher"]["tokens"] > 0

    scores = load_scores(str(run / "importance" / "scores.safetensors"))
    scores.check_model(teacher)
    assert (run / "distill" / "metrics.jsonl").is_file()
    assert "model" in out and "report.md" in out  # the printed summary table

    import torch
    import transformers

    hf = transformers.AutoModelForCausalLM.from_pretrained(summary["export"])
    assert hf.config.hidden_size == student.hidden_size
    assert hf.config.num_hidden_layers == student.num_layers
    with torch.no_grad():
        logits = hf(torch.tensor([[1, 2, 3, 4]])).logits
    assert torch.isfinite(logits).all()

    report = (run / "report.md").read_text()
    assert "distilled" in report
    assert any(run.glob("**/*.png"))

    # experiment=smoke sets eval.tasks: the final student also went through `minitron eval`
    suite = json.loads((run / "eval" / "eval.json").read_text())
    assert suite["checkpoint"] == str(Path(rows["distilled"]["path"]).resolve())
    assert suite["perplexity"]["valid"]["loss"] > 0
    assert "acc,none" in suite["tasks"]["minitron_next_line"]
    assert "## Evaluation" in report and "minitron_next_line" in report
    # ... and so did the teacher and the pruned student, on the same sets and tasks
    models = json.loads((run / "eval" / "eval_models.json").read_text())["models"]
    assert list(models) == ["teacher", "pruned", "distilled"]
    assert models["distilled"] == suite
    for m in models.values():
        assert set(m["perplexity"]) == set(suite["perplexity"]) and set(m["tasks"]) == set(
            suite["tasks"])
    assert models["teacher"]["perplexity"]["valid"]["loss"] < models["pruned"]["perplexity"][
        "valid"]["loss"]
    assert "| set | teacher | pruned | distilled |" in report


def test_rerun_skips_finished_stages_and_force_reruns_from_a_stage(smoke, tmp_path):
    run, _ = smoke
    before = {p: p.stat().st_mtime_ns for p in run.glob("*/stage.json")}
    out = run_pipeline(run)
    assert "stage distill" not in out and "stage importance" not in out
    after = {p: p.stat().st_mtime_ns for p in run.glob("*/stage.json")}
    assert {p: t for p, t in after.items() if p.parent.name != "report"} == \
        {p: t for p, t in before.items() if p.parent.name != "report"}


def _rerun_eval(run, *extra):
    p = minitron("pipeline", "experiment=smoke", f"run.dir={run}", "pipeline.force=[eval]",
                 *extra)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err[-3000:]
    return err


def test_eval_reuses_the_scores_of_checkpoints_it_scored_before(smoke):
    """The eval stage's cache (eval/score_cache.py): a forced rerun finds all three
    checkpoints scored (the smoke run wrote them) and writes the same eval files
    (tests/test_eval.py: damaged and foreign entries)."""
    run, _ = smoke
    files = [run / "eval" / n for n in ("eval_models.json", "models.json")]
    before = [f.read_text() for f in files]
    err = _rerun_eval(run)
    for name in ("teacher", "pruned", "distilled"):
        assert f"the {name} checkpoint was scored before" in err
    assert [f.read_text() for f in files] == before


def test_kill_during_distillation_then_rerun_gives_the_same_final_metrics(smoke, tmp_path):
    run, _ = smoke
    killed = tmp_path / "killed"
    p = minitron("pipeline", "experiment=smoke", f"run.dir={killed}")
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if (killed / "distill" / "metrics.jsonl").exists() and len(losses(killed / "distill")) >= 6:
            p.send_signal(signal.SIGKILL)
            break
        time.sleep(0.02)
    p.wait(timeout=60)
    assert p.returncode == -signal.SIGKILL, "the pipeline finished before it could be killed"
    assert not (killed / "distill" / "stage.json").exists()

    out = run_pipeline(killed)
    assert "stage importance" not in out and "stage distill" in out
    assert losses(killed / "distill") == losses(run / "distill")
    a = json.loads((run / "summary.json").read_text())["rows"]
    b = json.loads((killed / "summary.json").read_text())["rows"]
    assert [(r["name"], r["loss"], r["tokens"]) for r in a] == \
        [(r["name"], r["loss"], r["tokens"]) for r in b]


def test_iterative_pipeline_reaches_the_target_in_rounds(tmp_path):
    from megatron_minitron.checkpoint.dist import read_header

    run_pipeline(tmp_path, "pipeline.iterations=2", "pipeline.export=false",
                 "pipeline.distill_iters=4")
    sizes = [read_header(str(tmp_path / f"prune_{r}" / "checkpoint")).model.num_parameters(False)
             for r in (1, 2)]
    teacher = read_header(str(tmp_path / "correction" / "checkpoints")).model
    assert sizes[0] > sizes[1]
    assert 0.4 < sizes[1] / teacher.num_parameters(False) <= 0.5
    assert (tmp_path / "distill_2" / "stage.json").is_file()
    # the last round ends at the architecture one round would prune to
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.pipeline.run import final_model, round_configs

    one_shot = final_model(teacher, round_configs(load_config(["experiment=smoke"]), teacher))
    final = read_header(str(tmp_path / "prune_2" / "checkpoint")).model
    assert final.num_parameters() == one_shot.num_parameters()
    assert (final.hidden_size, final.ffn_hidden_size) == (one_shot.hidden_size,
                                                          one_shot.ffn_hidden_size)


def test_iterative_rounds_end_at_the_one_shot_architecture():
    """SmolLM2-135M at half its non-embedding parameters: two rounds of the budget alone end at
    ffn 1048 (71.7M) against one round's 1031 (71.1M); the last round takes one round's sizes."""
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.pipeline.run import final_model, round_configs

    def architecture(m):
        return {a: getattr(m, a) for a in ("num_layers", "hidden_size", "ffn_hidden_size",
                                           "num_attention_heads", "num_query_groups")}

    for fraction in (0.5, 0.3):
        base = ["model=smollm2_135m", f"pipeline.param_fraction={fraction}"]
        one = load_config(base)
        teacher = one.model
        one_shot = final_model(teacher, round_configs(one, teacher))
        for iterations in (2, 3):
            cfg = load_config(base + [f"pipeline.iterations={iterations}"])
            rounds = round_configs(cfg, teacher)
            assert len(rounds) == iterations
            assert [r.prune.param_budget is None for r in rounds] == [False] * (iterations - 1) \
                + [True]  # the rounds before the last still follow their budgets
            final = final_model(teacher, rounds)
            assert architecture(final) == architecture(one_shot)
            assert final.num_parameters() == one_shot.num_parameters()
    assert architecture(one_shot)["ffn_hidden_size"] < teacher.ffn_hidden_size


def test_bad_teacher_is_one_line_error(tmp_path):
    p = minitron("pipeline", "experiment=smoke", f"run.dir={tmp_path}",
                 f"pipeline.teacher={tmp_path / 'nope'}")
    _, err = p.communicate(timeout=120)
    assert p.returncode == 2
    assert "pipeline.teacher" in err and "Fix:" in err


def test_search_mode_prunes_to_the_best_ranked_candidate(tmp_path):
    from megatron_minitron.checkpoint.dist import read_header

    run_pipeline(tmp_path, "pipeline.target=search", "search.max_candidates=2",
                 "search.distill_iters=2", "search.eval_iters=1", "pipeline.distill_iters=2",
                 "pipeline.export=false")
    ranking = json.loads((tmp_path / "search" / "ranking.json").read_text())
    rows = ranking["rows"] if isinstance(ranking, dict) else ranking
    assert len(rows) >= 2
    assert [r["val_loss"] for r in rows] == sorted(r["val_loss"] for r in rows)
    pruned = read_header(str(tmp_path / "prune" / "checkpoint")).model
    assert {k: getattr(pruned, k) for k in rows[0]["target"]} == rows[0]["target"]
