"""Architecture search: the candidate space (pure math) and the ranking by short distillation.

The end-to-end run builds a teacher with a known depth structure: a trained 2-layer model
followed by two dead layers (their attention and MLP write zeros), so the importance scores
mark layers 1-2 as the important block. Dropping the dead block gives back the teacher exactly;
the planted candidate drops the important block instead and must rank last.
"""

import dataclasses
import functools
import json
import tempfile
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.prune import AXES, PruneConfig
from megatron_minitron.config.search import AxisRange, SearchConfig
from megatron_minitron.pruning.plan import resolve_target
from megatron_minitron.pruning.candidates import all_candidates, search_candidates

BASE = ["data.seq_length=32", "train.micro_batch_size=4", "train.global_batch_size=4",
        "train.eval_interval=0", "train.eval_iters=2", "logger.backend=none",
        "logger.progress_bar=false", "train.optimizer.lr_warmup_iters=0",
        "runtime.device=cpu", "runtime.transformer_impl=local"]
TEACHER_ITERS, SEARCH_ITERS = 150, 8
PLANTED = ["search.extra_candidates=[{name: planted, depth_mode: list, drop_layers: [1, 2]}]"]


def llama_like() -> ModelConfig:
    return ModelConfig(num_layers=8, hidden_size=256, ffn_hidden_size=768,
                       num_attention_heads=8, num_query_groups=4, kv_channels=32,
                       vocab_size=1000)


# ---- the candidate space -------------------------------------------------------------------

@pytest.mark.parametrize("prune, search", [
    (PruneConfig(), SearchConfig(max_candidates=12)),
    (PruneConfig(tensor_model_parallel_size=2, ffn_hidden_size_divisor=64,
                 hidden_size_divisor=32, budget_include_embeddings=False),
     SearchConfig(tolerance=0.02, axes=["hidden_size", "ffn_hidden_size", "num_layers"],
                  hidden_size=AxisRange(min_fraction=0.5), max_candidates=6)),
])
def test_every_candidate_fits_the_budget_and_is_a_valid_prune_target(prune, search):
    src = llama_like()
    budget = int(0.6 * src.num_parameters(include_embeddings=prune.budget_include_embeddings))
    cands = search_candidates(src, budget, search, prune)
    assert 0 < len(cands) <= search.max_candidates
    assert len({c.name for c in cands}) == len(cands)
    for c in cands:
        assert abs(c.params - budget) <= search.tolerance * budget, c.name
        target = resolve_target(src, c.prune_config(prune))  # raises on any invalid axis
        assert {a: getattr(target, a) for a in AXES} == c.sizes
        assert c.params == target.num_parameters(prune.budget_include_embeddings)
        assert target.hidden_size % target.num_attention_heads == 0  # HF-exportable
        assert target.num_query_groups % prune.tensor_model_parallel_size == 0
        assert target.ffn_hidden_size % prune.ffn_hidden_size_divisor == 0
        assert target.ffn_hidden_size % prune.tensor_model_parallel_size == 0
        for a in AXES:
            full, rng = getattr(src, a), getattr(search, a)
            if a in search.axes:
                assert rng.min_fraction * full <= c.sizes[a] <= full
            else:
                assert c.sizes[a] == full, a
    assert search_candidates(src, budget, search, prune) == cands  # deterministic


def test_the_short_list_spreads_over_depth_width_and_mixed_closest_first():
    src, prune, search = llama_like(), PruneConfig(), SearchConfig(max_candidates=6)
    budget = int(0.75 * src.num_parameters())
    every = all_candidates(src, budget, search, prune)
    chosen = search_candidates(src, budget, search, prune)
    assert [c.kind for c in chosen[:3]] == ["depth", "width", "mixed"]
    for c in chosen[:3]:  # each kind is represented by its candidate closest to the budget
        best = min(abs(o.params - budget) for o in every if o.kind == c.kind)
        assert abs(c.params - budget) == best
    depth = [c for c in every if c.kind == "depth"]
    assert all(c.changed(src) == ("num_layers",) for c in depth)
    assert {c.sizes["num_layers"] for c in depth} == {6}  # 6 of 8 layers ~ 75%


def test_an_empty_search_space_and_bad_ranges_name_the_field():
    src = llama_like()
    with pytest.raises(ConfigError) as e:
        search_candidates(src, 1000, SearchConfig(), PruneConfig())
    assert e.value.field == "search.tolerance"
    with pytest.raises(ConfigError) as e:
        SearchConfig(num_layers=AxisRange(min_fraction=0.0))
    assert e.value.field == "search.num_layers.min_fraction"
    with pytest.raises(ConfigError) as e:
        SearchConfig(axes=["hidden"])
    assert e.value.field == "search.axes"


def test_search_config_composes_with_extra_candidates():
    from megatron_minitron.config.loader import load_config

    cfg = load_config(["search.param_budget=1000", "search.num_layers.step=2"] + PLANTED)
    (extra,) = cfg.search.extra_candidates
    assert (extra.name, extra.depth_mode, extra.drop_layers) == ("planted", "list", [1, 2])
    assert cfg.search.num_layers.step == 2
    with pytest.raises(ConfigError, match="search.extra_candidates"):
        load_config(["search.extra_candidates=[{depth_mode: list}]"])


def test_ranking_puts_nan_last_and_breaks_ties_by_name():
    from megatron_minitron.pipeline.search_runs import rank_rows

    rows = [{"name": n, "val_loss": v} for n, v in
            (("b", 2.0), ("c", float("nan")), ("a", 2.0), ("d", 1.0))]
    assert [r["name"] for r in rank_rows(rows)] == ["d", "a", "b", "c"]


# ---- end to end (one spawned process) ------------------------------------------------------

def _load(overrides):
    from megatron_minitron.config.loader import load_config

    return load_config(BASE + overrides)


def _planted_teacher(root: str) -> str:
    """Trained 2-layer model + 2 dead layers (zero linear_proj and linear_fc2) = 4 layers whose
    function is the 2-layer model's."""
    from megatron_minitron.checkpoint.dist import CheckpointHeader, load, read_header, save
    from megatron_minitron.config.parallel import ParallelConfig
    from megatron_minitron.models.builder import build_model, unwrap
    from megatron_minitron.runtime.distributed import initialize, teardown
    from megatron_minitron.training.lm import train_lm

    train_lm(_load([f"run.dir={root}/two", "model.num_layers=2", f"train.train_iters="
                    f"{TEACHER_ITERS}", "train.optimizer.lr=3e-3"]))
    cfg = _load([])
    ctx = initialize(ParallelConfig(), cfg.runtime)
    try:
        header = read_header(f"{root}/two/checkpoints")
        two = build_model(header.model, ParallelConfig(), cfg.runtime, ctx.device)
        load(f"{root}/two/checkpoints", two, ctx=ctx)
        m4 = dataclasses.replace(header.model, num_layers=4)
        four = build_model(m4, ParallelConfig(), cfg.runtime, ctx.device)
        sd = unwrap(four[0]).state_dict()
        sd.update(unwrap(two[0]).state_dict())  # layers 0-1, embedding, final norm, output
        for i in (2, 3):
            sd[f"decoder.layers.{i}.self_attention.linear_proj.weight"].zero_()
            sd[f"decoder.layers.{i}.mlp.linear_fc2.weight"].zero_()
        unwrap(four[0]).load_state_dict(sd)
        save(f"{root}/teacher", 0, four, CheckpointHeader(model=m4, tokenizer=header.tokenizer),
             ctx=ctx)
        return dataclasses.replace(m4, num_layers=2).num_parameters()
    finally:
        teardown()


def _built_params(paths):
    from megatron_minitron.checkpoint.dist import read_header
    from megatron_minitron.config.parallel import ParallelConfig
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import initialize, teardown

    cfg = _load([])
    ctx = initialize(ParallelConfig(), cfg.runtime)
    try:
        return [sum(p.numel() for c in build_model(read_header(p).model, ParallelConfig(),
                                                    cfg.runtime, ctx.device)
                    for p in c.parameters()) for p in paths]
    finally:
        teardown()


def _search_run(root: str):
    from megatron_minitron.cli import importance, search
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.pipeline.search_runs import run_search

    budget = _planted_teacher(root)
    importance.main(BASE + [f"run.dir={root}", f"importance.checkpoint={root}/teacher",
                            "importance.num_samples=16", "importance.block_sizes=[2]"])
    common = [f"run.dir={root}", f"search.checkpoint={root}/teacher",
              f"search.param_budget={budget}", "search.max_candidates=3",
              f"search.distill_iters={SEARCH_ITERS}", "search.eval_iters=4",
              "train.optimizer.lr=1e-3"] + PLANTED
    result = run_search(_load(common))
    written = json.loads(result.ranking_json.read_text())
    folders = [Path(root) / "search" / r["name"] for r in result.ranking]

    def snapshot():  # what a rerun must leave alone
        return [((f / "pruned" / "latest").stat().st_mtime_ns, (f / "metrics.jsonl").read_text(),
                 (f / "result.json").stat().st_mtime_ns) for f in folders]

    before = snapshot()
    search.main(BASE + common)  # the CLI, on a finished search
    again = json.loads(result.ranking_json.read_text())
    by_kd = run_search(_load(common + ["search.metric=kd_loss"]))  # re-ranks stored rows
    unchanged = snapshot() == before
    zero = run_search(_load(common + ["search.zero_shot=true"]))
    built = _built_params([r["pruned"] for r in result.ranking[:2]])
    scores = load_scores(f"{root}/importance/scores.safetensors").tensors
    return {"result": result, "written": written, "again": again, "by_kd": by_kd,
            "unchanged": unchanged, "zero": zero,
            "built": built, "scores": scores}


@functools.lru_cache(maxsize=None)
def search_run():
    root = tempfile.mkdtemp(prefix="minitron_search_")
    return root, run_distributed(_search_run, 1, root)[0]


def test_search_ranks_candidates_by_their_short_distillation_loss():
    from megatron_minitron.training.metrics import read_metrics

    root, run = search_run()
    result = run["result"]
    rows = result.ranking
    assert len(rows) == 4 and {r["kind"] for r in rows} == {"depth", "width", "mixed", "extra"}
    losses = [r["val_loss"] for r in rows]
    assert losses == sorted(losses) and result.best == rows[0]
    for r in rows:  # the score is the distillation run's own final validation
        valid = [m for m in read_metrics(f"{root}/search/{r['name']}") if "valid_lm_loss" in m]
        assert valid[-1]["step"] == SEARCH_ITERS and valid[-1]["valid_lm_loss"] == r["val_loss"]
        assert Path(r["distilled"]).name == f"step_{SEARCH_ITERS:07d}"
    assert run["written"] == rows
    table = result.ranking_md.read_text()
    assert [table.index(f"| {r['name']} |") for r in rows] == sorted(
        table.index(f"| {r['name']} |") for r in rows)


def test_the_planted_bad_candidate_ranks_last_and_dropping_the_dead_block_wins():
    from megatron_minitron.checkpoint.dist import read_header
    from megatron_minitron.pipeline.search_runs import row_prune_config
    from megatron_minitron.pruning.depth import select_layers

    _, run = search_run()
    s = run["scores"]
    assert s["layers.loss"][:2].min() > s["layers.loss"][2:].max()  # layers 1-2 matter
    assert int(torch.argmax(s["blocks.loss.k2"])) == 0
    rows = run["result"].ranking
    assert rows[-1]["name"] == "planted" and rows[-1]["layers"] == [3, 4]
    assert rows[0]["kind"] == "depth" and rows[0]["layers"] == [1, 2]
    src = read_header(rows[-1]["settings"]["source"]).model
    planted = row_prune_config(rows[-1], PruneConfig())  # what a pipeline would prune with
    assert {a: getattr(resolve_target(src, planted), a) for a in AXES} == rows[-1]["target"]
    assert select_layers(src, 2, None, planted) == [3, 4]
    assert rows[-1]["val_loss"] > rows[-2]["val_loss"] + 0.02
    kd = [r["valid"]["valid_kd_loss"] for r in rows]
    assert kd[-1] > 2 * max(kd[:-1])  # still far from the teacher after the short distillation


def test_parameter_counts_match_the_built_models():
    _, run = search_run()
    rows = run["result"].ranking
    assert run["built"] == [r["params"] for r in rows[:2]]


def test_a_rerun_reads_the_finished_results_instead_of_training_again():
    _, run = search_run()
    assert run["unchanged"]
    assert run["again"] == run["result"].ranking
    kd = run["by_kd"].ranking
    assert [r["val_loss"] for r in kd] == sorted(r["valid"]["valid_kd_loss"] for r in kd)
    assert kd[-1]["name"] == "planted"


def test_zero_shot_ranks_right_after_pruning():
    _, run = search_run()
    zero = run["zero"]
    assert zero.ranking_json.name == "ranking_zero_shot.json"
    assert all(r["distilled"] is None and r["iters"] == 0 for r in zero.ranking)
    depth = next(r for r in zero.ranking if r["kind"] == "depth")
    # dropping the dead block leaves the teacher's function: no divergence before training
    assert depth["valid"]["valid_kd_loss"] == pytest.approx(0.0, abs=1e-5)
    assert zero.ranking[0] == depth and zero.ranking[-1]["name"] == "planted"
    assert {r["pruned"] for r in zero.ranking} == {r["pruned"] for r in run["result"].ranking}
