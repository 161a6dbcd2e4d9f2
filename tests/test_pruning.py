"""Pruning: target validation, budgets, plans, slicing, and end-to-end checkpoint pruning.

The megatron-core runs happen inside test_importance's spawned processes (`pruning_checks`,
`logits_at_tp`), which reuse its checkpoints and scores files; the tests here assert on them.
"""

import dataclasses
import math

import pytest
import torch

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.prune import PruneConfig, PruneTarget
from megatron_minitron.importance.scores import Scores, ScoresHeader, model_config_hash
from megatron_minitron.pruning.depth import renumber, select_layers
from megatron_minitron.pruning.plan import make_plan, resolve_target
from megatron_minitron.pruning.slicing import head_columns, qkv_rows, slice_state_dict
from test_importance import (DEAD_CHANNELS, DEAD_GROUP, DEAD_LAYER, DEAD_NEURONS, batches,
                             layout_run, logits, model_cfg, single_run)

SQRT = math.sqrt(64 / 60)  # RMS over 60 instead of 64 channels (4 dead ones are exact zeros)


def equivalence_cfg() -> PruneConfig:
    return PruneConfig(target=PruneTarget(num_attention_heads=2, ffn_hidden_size=128,
                                          num_layers=3), depth_metric="loss")


def planted_cfg() -> PruneConfig:
    return PruneConfig(target=PruneTarget(hidden_size=60, ffn_hidden_size=189,
                                          num_query_groups=1, num_layers=3),
                       head_mode="groups", depth_metric="cosine")


def magnitude_cfg() -> PruneConfig:
    """planted_cfg without depth: magnitude scores rank no layers."""
    return PruneConfig(target=PruneTarget(hidden_size=60, ffn_hidden_size=189,
                                          num_query_groups=1), head_mode="groups")


def zero_dropped(sd, plan):
    """The source model with every dropped head / neuron / layer silenced: what slicing must
    reproduce exactly when only heads, neurons and layers shrink."""
    sd = {k: v.clone() for k, v in sd.items()}
    m = plan.source
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        proj, fc2 = sd[p + "self_attention.linear_proj.weight"], sd[p + "mlp.linear_fc2.weight"]
        if i + 1 not in plan.layers:
            proj.zero_(), fc2.zero_()
            continue
        keep = torch.zeros(proj.shape[1], dtype=torch.bool)
        keep[head_columns(plan.heads[i], m.kv_channels)] = True
        proj[:, ~keep] = 0
        dead = torch.ones(fc2.shape[1], dtype=torch.bool)
        dead[plan.ffn[i]] = False
        fc2[:, dead] = 0
    return sd


def pruning_checks(root, chunks, ctx, runtime):
    """Spawned (test_importance._single): prune the base and planted checkpoints."""
    from megatron_minitron.checkpoint.dist import load, read_header
    from megatron_minitron.config.parallel import ParallelConfig
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.models.builder import build_model, unwrap
    from megatron_minitron.pruning.slicing import prune_checkpoint

    tokens = next(batches()())["tokens"]

    def pruned_logits(path, norm_scale=1.0):
        model = build_model(read_header(path).model, ParallelConfig(), runtime, ctx.device)
        load(path, model, ctx=ctx)
        with torch.no_grad():
            for name, p in unwrap(model[0]).named_parameters():
                if "layernorm" in name:
                    p.mul_(norm_scale)
        return logits(model, tokens)

    out = {}
    load(f"{root}/base", chunks, ctx=ctx)
    base = logits(chunks, tokens)
    sd = {k: v.clone() for k, v in unwrap(chunks[0]).state_dict().items() if torch.is_tensor(v)}
    for name, scores in (("identity", None), ("identity_scored", f"{root}/base.safetensors")):
        path = prune_checkpoint(f"{root}/base", scores, PruneConfig(), f"{root}/{name}", ctx,
                                runtime)
        out[name] = (pruned_logits(path), base)

    cfg = equivalence_cfg()
    plan = make_plan(model_cfg(), resolve_target(model_cfg(), cfg),
                     load_scores(f"{root}/base.safetensors"), cfg)
    path = prune_checkpoint(f"{root}/base", f"{root}/base.safetensors", cfg, f"{root}/pruned",
                            ctx, runtime)
    unwrap(chunks[0]).load_state_dict(zero_dropped(sd, plan), strict=False)
    out["equivalence"] = (pruned_logits(path), logits(chunks, tokens))
    out["equivalence_plan"] = plan

    load(f"{root}/planted", chunks, ctx=ctx)
    path = prune_checkpoint(f"{root}/planted", f"{root}/planted.safetensors", planted_cfg(),
                            f"{root}/planted_pruned", ctx, runtime)
    out["planted_pruned"] = (pruned_logits(path, SQRT), logits(chunks, tokens))
    out["planted_target"] = read_header(path).model
    # the baselines' scores files go through the same prune path unchanged
    path = prune_checkpoint(f"{root}/planted", f"{root}/planted_magnitude0.safetensors",
                            magnitude_cfg(), f"{root}/magnitude_pruned", ctx, runtime)
    out["magnitude_pruned"] = (pruned_logits(path, SQRT), logits(chunks, tokens))
    path = prune_checkpoint(f"{root}/planted", f"{root}/planted_random5.safetensors",
                            planted_cfg(), f"{root}/random_pruned", ctx, runtime)
    out["random_pruned"] = (pruned_logits(path), read_header(path).model)
    return out


def logits_at_tp(path, ctx, parallel, runtime):
    """Spawned: full-vocabulary logits of a checkpoint loaded at this rank's TP."""
    import torch.distributed as dist

    from megatron_minitron.checkpoint.dist import load, read_header
    from megatron_minitron.models.builder import build_model

    model = build_model(read_header(path).model, parallel, runtime, ctx.device)
    load(path, model, ctx=ctx)
    local = logits(model, next(batches()())["tokens"])  # [b, s, V/tp]
    parts = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)


def fake_scores(m=None, seed=0) -> Scores:
    m = m or model_cfg()
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.rand(*s, generator=g)  # noqa: E731
    heads = r(m.num_layers, m.num_attention_heads)
    tensors = {"mlp.neurons": r(m.num_layers, m.ffn_hidden_size), "attention.heads": heads,
               "attention.query_groups": heads.reshape(m.num_layers, m.num_query_groups, -1).sum(-1),
               "embedding.channels": r(m.hidden_size), "layers.cosine": r(m.num_layers),
               "layers.loss": r(m.num_layers), "blocks.loss.k2": torch.tensor([0.3, 0.1, 0.2])}
    header = ScoresHeader(model_config_hash(m), dataclasses.asdict(m), 8, "mean", "l2",
                          block_sizes=[2])
    return Scores(tensors, header)


# ---- validation ----------------------------------------------------------------------------

@pytest.mark.parametrize("target, extra, field, near", [
    (dict(num_attention_heads=3), {}, "num_attention_heads", "[2, 4]"),
    (dict(hidden_size=70), {}, "hidden_size", "[64]"),
    (dict(ffn_hidden_size=100), dict(ffn_hidden_size_divisor=64), "ffn_hidden_size", "[64, 128]"),
    (dict(num_query_groups=1), dict(tensor_model_parallel_size=2), "num_query_groups", "[2]"),
    (dict(num_layers=3), dict(pipeline_model_parallel_size=2), "num_layers", "[2, 4]"),
    (dict(hidden_size=62), {}, "hidden_size", "[60, 64]"),  # HF: hidden % heads
    (dict(num_attention_heads=4, num_query_groups=1), {}, "num_attention_heads", "[2]"),
])
def test_bad_targets_name_the_field_and_nearest_values(target, extra, field, near):
    with pytest.raises(ConfigError) as e:
        resolve_target(model_cfg(), PruneConfig(target=PruneTarget(**target), **extra))
    assert e.value.field == f"prune.target.{field}"
    assert near in str(e.value)


def test_group_mode_needs_whole_groups_and_hf_check_can_only_warn():
    with pytest.raises(ConfigError) as e:
        resolve_target(model_cfg(), PruneConfig(target=PruneTarget(num_attention_heads=3),
                                                head_mode="groups"))
    assert e.value.field == "prune.target.num_attention_heads"
    t = resolve_target(model_cfg(), PruneConfig(target=PruneTarget(num_attention_heads=2),
                                                head_mode="groups"))
    assert (t.num_attention_heads, t.num_query_groups, t.kv_channels) == (2, 1, 16)
    with pytest.warns(UserWarning, match="Hugging Face"):
        t = resolve_target(model_cfg(), PruneConfig(target=PruneTarget(hidden_size=62),
                                                    require_hf_export=False))
    assert t.hidden_size == 62


def test_scores_of_another_model_are_refused():
    other = fake_scores(dataclasses.replace(model_cfg(), ffn_hidden_size=96))
    target = resolve_target(model_cfg(), PruneConfig(target=PruneTarget(ffn_hidden_size=96)))
    with pytest.raises(ConfigError) as e:
        make_plan(model_cfg(), target, other, PruneConfig())
    assert e.value.field == "prune.scores"


def test_budget_resolves_to_the_largest_valid_target_under_it():
    m = model_cfg()
    budget = int(m.num_parameters() * 0.8)
    cfg = PruneConfig(param_budget=budget, ffn_hidden_size_divisor=16)
    t = resolve_target(m, cfg)
    assert t.num_parameters() <= budget and t.ffn_hidden_size % 16 == 0
    assert t.hidden_size % t.num_attention_heads == 0 and t.num_layers == m.num_layers
    assert t.num_parameters() > 0.9 * budget
    with pytest.raises(ConfigError) as e:
        resolve_target(m, PruneConfig(param_budget=1000))
    assert e.value.field == "prune.param_budget"


# ---- plans and slicing ---------------------------------------------------------------------

def test_qkv_rows_follow_the_interleaved_group_layout():
    # hpg=2, hn=1: group g owns rows [q0, q1, k, v] = 4g .. 4g+3
    assert qkv_rows(torch.tensor([1]), torch.tensor([3]), 2, 1).tolist() == [5, 6, 7]
    assert qkv_rows(torch.tensor([0, 1]), torch.tensor([0, 3]), 2, 1).tolist() == \
        [0, 2, 3, 5, 6, 7]
    assert head_columns(torch.tensor([1, 3]), 2).tolist() == [2, 3, 6, 7]


def test_depth_selection_modes():
    m, s = model_cfg(), fake_scores()
    assert select_layers(m, 2, s, PruneConfig(depth_mode="block")) == [1, 4]  # block 2-3 cheapest
    loss = s.tensors["layers.loss"]
    assert select_layers(m, 2, s, PruneConfig()) == sorted(
        (torch.argsort(-loss)[:2] + 1).tolist())
    assert select_layers(m, 3, s, PruneConfig(depth_mode="list", drop_layers=[2])) == [1, 3, 4]
    with pytest.raises(ConfigError, match="block_sizes"):
        select_layers(m, 3, s, PruneConfig(depth_mode="block"))
    sd = {"decoder.layers.0.a": 0, "decoder.layers.3.a": 3, "embedding.x": 9}
    assert renumber(sd, [4]) == {"decoder.layers.0.a": 3, "embedding.x": 9}


def test_heads_mode_keeps_the_best_heads_of_every_group():
    m, s = model_cfg(), fake_scores()
    cfg = PruneConfig(target=PruneTarget(num_attention_heads=2))
    plan = make_plan(m, resolve_target(m, cfg), s, cfg)
    for i in range(m.num_layers):
        h = s.tensors["attention.heads"][i]
        best = [int(torch.argmax(h[2 * g:2 * g + 2])) + 2 * g for g in range(2)]
        assert plan.heads[i].tolist() == best and plan.groups[i].tolist() == [0, 1]


def test_keep_everything_plan_slices_to_the_same_state_dict():
    m = model_cfg()
    sd = single_run()[1]["base_sd"]
    plan = make_plan(m, resolve_target(m, PruneConfig()), None, PruneConfig())
    out = slice_state_dict(sd, plan)
    assert out.keys() == sd.keys() and all(torch.equal(out[k], sd[k]) for k in sd)


# ---- end to end (spawned runs) -------------------------------------------------------------

def test_keep_everything_pruning_is_an_identity():
    run = single_run()[1]
    for name in ("identity", "identity_scored"):
        pruned, base = run[name]
        assert torch.equal(pruned, base), name


def test_pruning_equals_silencing_the_dropped_heads_neurons_and_layers():
    run = single_run()[1]
    pruned, reference = run["equivalence"]
    torch.testing.assert_close(pruned, reference, rtol=1e-5, atol=1e-5)
    plan = run["equivalence_plan"]
    assert plan.target.num_attention_heads == 2 and plan.target.num_query_groups == 2
    assert all(len(h) == 2 and len(set((h // 2).tolist())) == 2 for h in plan.heads)


def test_planted_structure_is_removed_with_unchanged_logits():
    run = single_run()[1]
    pruned, planted = run["planted_pruned"]
    torch.testing.assert_close(pruned, planted, rtol=1e-5, atol=1e-5)
    t = run["planted_target"]
    assert (t.hidden_size, t.ffn_hidden_size, t.num_query_groups, t.num_attention_heads,
            t.num_layers, t.kv_channels) == (60, 189, 1, 2, 3, 16)


def test_planted_plan_drops_exactly_the_dead_indices():
    root, _ = single_run()
    from megatron_minitron.importance.scores import load_scores

    m, cfg = model_cfg(), planted_cfg()
    plan = make_plan(m, resolve_target(m, cfg), load_scores(f"{root}/planted.safetensors"), cfg)
    assert sorted(set(range(64)) - set(plan.hidden.tolist())) == DEAD_CHANNELS
    assert DEAD_LAYER not in plan.layers and len(plan.layers) == 3
    for i in range(m.num_layers):
        assert sorted(set(range(192)) - set(plan.ffn[i].tolist())) == DEAD_NEURONS[i]
        assert plan.groups[i].tolist() == [1 - DEAD_GROUP[i]]


def test_pruned_weights_do_not_depend_on_the_scoring_layout():
    from megatron_minitron.importance.scores import load_scores

    root, run = single_run()
    m = model_cfg()
    reference = load_scores(f"{root}/base.safetensors")
    for cfg in (equivalence_cfg(), PruneConfig(target=PruneTarget(hidden_size=48,
                                                                  num_query_groups=1))):
        target = resolve_target(m, cfg)
        want = slice_state_dict(run["base_sd"], make_plan(m, target, reference, cfg))
        for name in ("tp2", "pp2", "dp2"):
            scores = Scores(layout_run()[0][name], reference.header)
            got = slice_state_dict(run["base_sd"], make_plan(m, target, scores, cfg))
            assert all(torch.equal(got[k], want[k]) for k in want), name


def test_pruned_checkpoint_loads_at_another_tp():
    pruned, _ = single_run()[1]["equivalence"]
    for rank in layout_run():
        torch.testing.assert_close(rank["pruned_logits_tp2"], pruned, rtol=1e-5, atol=1e-5)


# ---- baseline scores -----------------------------------------------------------------------

def test_magnitude_scores_prune_the_planted_structure_with_unchanged_logits():
    pruned, planted = single_run()[1]["magnitude_pruned"]
    torch.testing.assert_close(pruned, planted, rtol=1e-5, atol=1e-5)


def test_random_scores_prune_through_the_same_path():
    pruned_logits, target = single_run()[1]["random_pruned"]
    assert (target.hidden_size, target.ffn_hidden_size, target.num_query_groups,
            target.num_layers) == (60, 189, 1, 3)
    assert torch.isfinite(pruned_logits).all()


def test_magnitude_scores_rank_no_layers():
    m, s = model_cfg(), fake_scores()
    s = Scores({k: v for k, v in s.tensors.items() if not k.startswith(("layers", "blocks"))},
               dataclasses.replace(s.header, source="magnitude", block_sizes=[]))
    with pytest.raises(ConfigError, match="depth_mode=list"):
        select_layers(m, 3, s, PruneConfig())
    assert select_layers(m, 3, s, PruneConfig(depth_mode="list", drop_layers=[2])) == [1, 3, 4]
