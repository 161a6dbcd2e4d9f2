"""Importance: aggregation math, the scores file, planted structure, permutation and layouts.

Everything that needs megatron-core runs in spawned processes (tests/distributed.py): one
single-process run (`single_run`, shared with test_pruning.py) and one two-process run over the
TP=2, PP=2 and DP=2 layouts (`layout_run`).
"""

import dataclasses
import functools
import tempfile
from pathlib import Path

import pytest
import torch

from distributed import run_distributed
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.importance import ImportanceConfig
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.importance import aggregation as agg
from megatron_minitron.importance.hooks import normalised
from megatron_minitron.importance.scores import (Scores, ScoresHeader, load_scores,
                                                 model_config_hash, save_scores)

# tiny.yaml's shape; a tiny norm epsilon so removing an all-zero channel is exact up to the
# RMS factor sqrt(h / h') that test_pruning compensates
MODEL = dict(num_layers=4, hidden_size=64, ffn_hidden_size=192, num_attention_heads=4,
             num_query_groups=2, kv_channels=16, vocab_size=257, layernorm_epsilon=1e-12)
SEQ, MBS, NUM_BATCHES = 32, 2, 4
DEAD_NEURONS = {0: [3, 50, 100], 1: [0, 1, 2], 2: [7, 8, 191], 3: [10, 90, 150]}
DEAD_GROUP = {0: 0, 1: 1, 2: 1, 3: 0}  # layer -> query group whose values are zero
DEAD_CHANNELS = [5, 17, 40, 63]
DEAD_LAYER = 3  # layer_number whose attention and MLP write nothing
PERM = [1, 0]


def model_cfg() -> ModelConfig:
    return ModelConfig(**MODEL)


def batches(dp_rank: int = 0, dp_size: int = 1):
    """Fixed random calibration batches; DP rank r takes micro-batches r, r + dp_size, ..."""
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(NUM_BATCHES):
        ids = torch.randint(0, MODEL["vocab_size"], (MBS, SEQ + 1), generator=g)
        out.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(MBS, SEQ),
                    "position_ids": torch.arange(SEQ).expand(MBS, -1).contiguous()})
    mine = out[dp_rank::dp_size]
    return lambda: iter(mine)


def plant(sd, m: ModelConfig):
    """Make chosen neurons, query groups, channels and one layer inert, so their activations
    (and scores) are exactly zero and removing them leaves the function unchanged."""
    sd = {k: v.clone() if torch.is_tensor(v) else v for k, v in sd.items()}
    f, hn, hpg = m.ffn_hidden_size, m.kv_channels, m.heads_per_group
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}."
        for j in DEAD_NEURONS[i]:  # silu(0) * 0 = 0 enters linear_fc2
            sd[p + "mlp.linear_fc1.weight"][[j, f + j]] = 0
        g = DEAD_GROUP[i]  # zero values: every head of the group outputs softmax @ 0 = 0
        v0 = g * (hpg + 2) * hn + (hpg + 1) * hn
        sd[p + "self_attention.linear_qkv.weight"][v0:v0 + hn] = 0
        # nothing writes the dead channels of the residual stream
        sd[p + "self_attention.linear_proj.weight"][DEAD_CHANNELS] = 0
        sd[p + "mlp.linear_fc2.weight"][DEAD_CHANNELS] = 0
    sd["embedding.word_embeddings.weight"][:, DEAD_CHANNELS] = 0
    p = f"decoder.layers.{DEAD_LAYER - 1}."
    sd[p + "self_attention.linear_proj.weight"].zero_()
    sd[p + "mlp.linear_fc2.weight"].zero_()
    return sd


def permute_groups(sd, m: ModelConfig, perm):
    """New group j = old group perm[j] in every layer (qkv row blocks, proj column blocks)."""
    sd = dict(sd)
    blk, heads = (m.heads_per_group + 2) * m.kv_channels, m.heads_per_group * m.kv_channels
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}.self_attention."
        rows = torch.cat([torch.arange(g * blk, (g + 1) * blk) for g in perm])
        cols = torch.cat([torch.arange(g * heads, (g + 1) * heads) for g in perm])
        sd[p + "linear_qkv.weight"] = sd[p + "linear_qkv.weight"][rows].clone()
        sd[p + "linear_proj.weight"] = sd[p + "linear_proj.weight"][:, cols].clone()
    return sd


def importance_cfg() -> ImportanceConfig:
    return ImportanceConfig(num_samples=NUM_BATCHES * MBS, micro_batch_size=MBS, block_sizes=[1, 2])


def logits(chunks, tokens):
    from megatron_minitron.models.builder import unwrap

    pos = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    with torch.no_grad():
        return unwrap(chunks[0])(tokens, pos, None).detach().clone()


def _init(tp=1, pp=1):
    from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
    from megatron_minitron.runtime.distributed import initialize

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    runtime = RuntimeConfig(device="cpu", transformer_impl="local")
    return initialize(parallel, runtime), parallel, runtime


def _single(root: str):
    """One process, TP=1: base/planted/permuted scores and the pruning runs of test_pruning."""
    from megatron_minitron.checkpoint.dist import CheckpointHeader, save
    from megatron_minitron.importance.runner import compute_importance
    from megatron_minitron.models.builder import build_model, unwrap
    from test_pruning import pruning_checks

    ctx, parallel, runtime = _init()
    m = model_cfg()
    chunks = build_model(m, parallel, runtime, ctx.device)
    gpt = unwrap(chunks[0])
    base_sd = {k: v.clone() for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
    out = {"base_sd": base_sd}

    def scores_of(sd, name):
        gpt.load_state_dict(sd, strict=False)
        save(f"{root}/{name}", 0, chunks, CheckpointHeader(model=m), ctx=ctx)
        s = compute_importance(chunks, m, importance_cfg(), batches(), ctx)
        save_scores(f"{root}/{name}.safetensors", s)
        return s.tensors

    out["base"] = scores_of(base_sd, "base")
    out["permuted"] = scores_of(permute_groups(base_sd, m, PERM), "permuted")
    out["planted"] = scores_of(plant(base_sd, m), "planted")
    out.update(pruning_checks(root, chunks, ctx, runtime))
    return out


@functools.lru_cache(maxsize=None)
def single_run():
    root = tempfile.mkdtemp(prefix="minitron_importance_")
    return root, run_distributed(_single, 1, root)[0]


def _layouts(root: str):
    """Two processes: scores at TP=2, PP=2 and DP=2 (megatron re-initialised in between),
    and the pruned checkpoint's logits at TP=2."""
    from megatron.core import parallel_state as ps

    from megatron_minitron.checkpoint.dist import load
    from megatron_minitron.importance.runner import compute_importance
    from megatron_minitron.models.builder import build_model
    from test_pruning import logits_at_tp

    out = {}
    for name, tp, pp in (("tp2", 2, 1), ("pp2", 1, 2), ("dp2", 1, 1)):
        ctx, parallel, runtime = _init(tp, pp)
        chunks = build_model(model_cfg(), parallel, runtime, ctx.device)
        load(f"{root}/base", chunks, ctx=ctx)
        s = compute_importance(chunks, model_cfg(), importance_cfg(),
                               batches(ctx.dp_rank, ctx.dp_size), ctx)
        out[name] = s.tensors
        if name == "tp2":
            out["pruned_logits_tp2"] = logits_at_tp(f"{root}/pruned", ctx, parallel, runtime)
        ps.destroy_model_parallel()
    return out


@functools.lru_cache(maxsize=None)
def layout_run():
    root, _ = single_run()
    return run_distributed(_layouts, 2, root)


# ---- pure math ----------------------------------------------------------------------------

@pytest.mark.parametrize("seq", ["mean", "l2", "var"])
@pytest.mark.parametrize("samples", ["mean", "l2", "var"])
def test_aggregation_matches_direct_formula_and_sums_over_shards(seq, samples):
    x = torch.randn(7, 6, 5)  # [s, b, c]
    per_sample = {"mean": x.abs().mean(0), "l2": x.norm(dim=0), "var": x.var(0, unbiased=False)}
    v = per_sample[seq]  # [b, c]
    direct = {"mean": v.mean(0), "l2": v.norm(dim=0), "var": v.var(0, unbiased=False)}[samples]
    m = ModelConfig(num_layers=1, hidden_size=8, ffn_hidden_size=5, num_attention_heads=2)
    halves = []
    for part in (x[:, :2], x[:, 2:]):  # two "data-parallel ranks"
        st = agg.new_stats(m)
        agg.accumulate(st, "neuron", 0, 0, agg.reduce_sequence(part, seq))
        halves.append(st)
    total = {k: halves[0][k] + halves[1][k] for k in halves[0]}
    got = agg.finalize(total["neuron_sum"][0], total["neuron_sumsq"][0], 6, samples)
    torch.testing.assert_close(got, direct, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["RMSNorm", "LayerNorm"])
def test_recomputed_norm_output_matches_the_norm_module(kind):
    """The Transformer-Engine path (norm fused into the linear) recomputes the norm output."""
    x, w, b = torch.randn(3, 2, 8), torch.randn(8), torch.randn(8)
    if kind == "RMSNorm":
        ref = torch.nn.functional.rms_norm(x, (8,), w, 1e-5)
        got = normalised(x, w, None, 1e-5, kind)
    else:
        ref = torch.nn.functional.layer_norm(x, (8,), w, b, 1e-5)
        got = normalised(x, w, b, 1e-5, kind)
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(normalised(x, w - 1, None, 1e-5, "RMSNorm", True),
                               normalised(x, w, None, 1e-5, "RMSNorm"))


def test_scores_file_round_trip_and_hash_check(tmp_path):
    m = model_cfg()
    header = ScoresHeader(model_config_hash=model_config_hash(m), model=dataclasses.asdict(m),
                          num_samples=8, seq_aggregation="mean", sample_aggregation="l2",
                          data={"paths": ["x"]}, block_sizes=[2])
    s = Scores({"mlp.neurons": torch.rand(4, 192), "blocks.loss.k2": torch.rand(3)}, header)
    back = load_scores(str(save_scores(str(tmp_path / "s.safetensors"), s)))
    assert back.header == header
    torch.testing.assert_close(back.tensors["mlp.neurons"], s.tensors["mlp.neurons"])
    back.check_model(m)
    with pytest.raises(ConfigError) as e:
        back.check_model(dataclasses.replace(m, ffn_hidden_size=96))
    assert e.value.field == "prune.scores"
    with pytest.raises(ConfigError, match="block_sizes"):
        back.block_loss(3)


def test_importance_config_validation():
    with pytest.raises(ConfigError) as e:
        ImportanceConfig(seq_aggregation="max")
    assert e.value.field == "importance.seq_aggregation"
    with pytest.raises(ConfigError) as e:
        ImportanceConfig(block_sizes=[0])
    assert e.value.field == "importance.block_sizes"


# ---- megatron-core model, spawned ----------------------------------------------------------

def _last(scores: torch.Tensor, dead) -> bool:
    """The dead indices have score exactly 0 and every other index scores above them."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    mask[dead] = True
    return bool((scores[mask] == 0).all() and (scores[~mask] > 0).all())


def test_planted_structure_ranks_last():
    s = single_run()[1]["planted"]
    m = model_cfg()
    for i in range(m.num_layers):
        assert _last(s["mlp.neurons"][i], DEAD_NEURONS[i]), i
        assert _last(s["attention.query_groups"][i], [DEAD_GROUP[i]]), i
        g = DEAD_GROUP[i]
        assert _last(s["attention.heads"][i], list(range(g * 2, g * 2 + 2))), i
    assert _last(s["embedding.channels"], DEAD_CHANNELS)
    # depth: the inert layer changes nothing, so skipping it costs exactly nothing
    assert s["layers.loss"][DEAD_LAYER - 1] == 0
    assert s["blocks.loss.k1"][DEAD_LAYER - 1] == 0
    cos = s["layers.cosine"]
    assert cos[DEAD_LAYER - 1].abs() < 1e-6 and int(cos.argmin()) == DEAD_LAYER - 1
    torch.testing.assert_close(s["blocks.loss.k1"], s["layers.loss"])


def test_permuting_query_groups_permutes_their_scores():
    run = single_run()[1]
    base, perm = run["base"], run["permuted"]
    torch.testing.assert_close(perm["attention.query_groups"],
                               base["attention.query_groups"][:, PERM], rtol=1e-5, atol=1e-6)
    heads = torch.tensor([[2 * g, 2 * g + 1] for g in PERM]).reshape(-1)
    torch.testing.assert_close(perm["attention.heads"], base["attention.heads"][:, heads],
                               rtol=1e-5, atol=1e-6)
    for name in ("mlp.neurons", "embedding.channels", "layers.cosine", "layers.loss"):
        torch.testing.assert_close(perm[name], base[name], rtol=1e-4, atol=1e-5)


def test_scores_do_not_depend_on_the_layout():
    reference = single_run()[1]["base"]
    ranks = layout_run()
    for name in ("tp2", "pp2", "dp2"):
        for rank in ranks:
            for key, ref in reference.items():
                torch.testing.assert_close(rank[name][key], ref, rtol=1e-4, atol=1e-5,
                                           msg=lambda msg: f"{name} {key}: {msg}")


def test_scores_file_written_by_the_run_loads(tmp_path):
    root, run = single_run()
    s = load_scores(str(Path(root) / "base.safetensors"))
    assert s.header.num_samples == NUM_BATCHES * MBS
    assert s.header.block_sizes == [1, 2] and s.header.base_loss > 0
    s.check_model(model_cfg())
    torch.testing.assert_close(s.tensors["mlp.neurons"], run["base"]["mlp.neurons"])
