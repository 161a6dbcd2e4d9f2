"""Importance: aggregation math, the scores file, planted structure, permutation, layouts,
padding masks, the magnitude / random baselines, empty calibration splits and the TE spec.

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


def batches(dp_rank: int = 0, dp_size: int = 1, seq: int = SEQ, padded_from: int = SEQ,
            pad_seed: int = 1):
    """Fixed random calibration batches; DP rank r takes micro-batches r, r + dp_size, ...
    Tokens from padded_from on are padding: loss_mask 0, random from pad_seed."""
    g, pad = torch.Generator().manual_seed(0), torch.Generator().manual_seed(pad_seed)
    out = []
    for _ in range(NUM_BATCHES):
        ids = torch.randint(0, MODEL["vocab_size"], (MBS, SEQ + 1), generator=g)[:, :seq + 1]
        if padded_from < seq:  # keep the last counted label (ids[padded_from]) real
            ids[:, padded_from + 1:] = torch.randint(
                0, MODEL["vocab_size"], ids[:, padded_from + 1:].shape, generator=pad)
        mask = torch.ones(MBS, seq)
        mask[:, padded_from:] = 0
        out.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": mask,
                    "position_ids": torch.arange(seq).expand(MBS, -1).contiguous()})
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
    runtime = RuntimeConfig(device="cpu", transformer_impl="local", precision="fp32")
    return initialize(parallel, runtime), parallel, runtime


def _single(root: str):
    """One process, TP=1: base/planted/permuted/padded/baseline scores and the pruning runs of
    test_pruning."""
    from megatron_minitron.checkpoint.dist import CheckpointHeader, save
    from megatron_minitron.importance.baselines import magnitude_scores
    from megatron_minitron.importance.runner import compute_importance, score_checkpoint
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
    out["base_magnitude"] = magnitude_scores(chunks, m, ctx).tensors
    # causal attention: the first half of a sequence cannot see the second half, so masking
    # the second half must give the scores of the first half alone, whatever the padding holds
    half = dict(num_samples=NUM_BATCHES * MBS, micro_batch_size=MBS, depth_loss=False)
    out["padded"] = [compute_importance(chunks, m, ImportanceConfig(**half), batches(
        padded_from=SEQ // 2, pad_seed=k), ctx).tensors for k in (1, 2)]
    out["truncated"] = compute_importance(chunks, m, ImportanceConfig(**half), batches(
        seq=SEQ // 2), ctx).tensors
    # depth losses on the first 2 of 4 micro-batches: as if scored on those 2 alone
    subset = dict(micro_batch_size=MBS, block_sizes=[2])
    out["depth_subset"] = compute_importance(chunks, m, ImportanceConfig(
        num_samples=NUM_BATCHES * MBS, depth_samples=2 * MBS, **subset), batches(), ctx).tensors
    out["depth_alone"] = compute_importance(chunks, m, ImportanceConfig(
        num_samples=2 * MBS, **subset), lambda: iter(list(batches()())[:2]), ctx).tensors
    out["permuted"] = scores_of(permute_groups(base_sd, m, PERM), "permuted")
    out["planted"] = scores_of(plant(base_sd, m), "planted")
    for source, seed in (("magnitude", 0), ("random", 5), ("random", 5), ("random", 6)):
        out.setdefault(source, []).append(score_checkpoint(
            f"{root}/planted", ImportanceConfig(source=source, block_sizes=[1]), None, ctx,
            parallel, dataclasses.replace(runtime, seed=seed),
            f"{root}/planted_{source}{seed}.safetensors").tensors)
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
    from megatron_minitron.importance.baselines import magnitude_scores
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
        out[f"{name}_magnitude"] = magnitude_scores(chunks, model_cfg(), ctx).tensors
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
    with pytest.raises(ConfigError) as e:
        ImportanceConfig(head_score="gradient")
    assert e.value.field == "importance.head_score"


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


# ---- token mask, baselines, calibration splits ---------------------------------------------

@pytest.mark.parametrize("how", ["mean", "l2", "var"])
def test_masked_sequence_reduction_ignores_padding(how):
    x = torch.randn(9, 3, 5)  # [s, b, c]
    mask = torch.ones(3, 9)
    mask[:, 6:] = 0
    got = agg.reduce_sequence(x, how, agg_mask(mask))
    torch.testing.assert_close(got, agg.reduce_sequence(x[:6], how))
    assert not torch.allclose(got, agg.reduce_sequence(x, how))


def agg_mask(loss_mask):
    m = agg.TokenMask()
    m.set(loss_mask)
    return m.value


def test_token_mask_costs_nothing_without_padding():
    assert agg_mask(torch.ones(2, 4)) is None
    assert agg_mask(torch.tensor([[1.0, 0.0]])).shape == (2, 1, 1)  # [b, s] -> [s, b, 1]


def test_depth_samples_score_depth_on_a_subset_and_width_on_all():
    _, out = single_run()
    sub, alone, full = out["depth_subset"], out["depth_alone"], out["base"]
    for key in ("layers.loss", "blocks.loss.k2"):
        torch.testing.assert_close(sub[key], alone[key])
        assert not torch.allclose(sub[key], full[key])  # another sample set: other values
    width = [k for k in full if not k.startswith(("layers.", "blocks."))]
    assert width
    for key in width:
        torch.testing.assert_close(sub[key], full[key])


def test_padding_tokens_do_not_count_in_width_or_cosine_scores():
    run = single_run()[1]
    first, other = run["padded"]
    for key, ref in run["truncated"].items():
        torch.testing.assert_close(first[key], ref, rtol=1e-5, atol=1e-6, msg=key)
        torch.testing.assert_close(other[key], first[key], rtol=1e-5, atol=1e-6, msg=key)


def test_magnitude_ranks_planted_structure_last():
    root, run = single_run()
    s = run["magnitude"][0]
    m = model_cfg()
    for i in range(m.num_layers):
        if i == DEAD_LAYER - 1:  # writes nothing: every neuron and head of it is inert
            assert (s["mlp.neurons"][i] == 0).all() and (s["attention.heads"][i] == 0).all()
            continue
        assert _last(s["mlp.neurons"][i], DEAD_NEURONS[i]), i
        assert _last(s["attention.query_groups"][i], [DEAD_GROUP[i]]), i
        g = DEAD_GROUP[i]
        assert _last(s["attention.heads"][i], list(range(g * 2, g * 2 + 2))), i
    assert _last(s["embedding.channels"], DEAD_CHANNELS)
    assert not any(k.startswith(("layers.", "blocks.")) for k in s)
    header = load_scores(f"{root}/planted_magnitude0.safetensors").header
    assert header.source == "magnitude" and header.num_samples == 0
    assert header.model_config_hash == model_config_hash(model_cfg())


def test_random_scores_are_deterministic_by_seed():
    a, again, other = single_run()[1]["random"]
    assert set(a) >= {"mlp.neurons", "attention.heads", "attention.query_groups",
                      "embedding.channels", "layers.cosine", "layers.loss", "blocks.loss.k1"}
    for key in a:
        assert torch.equal(a[key], again[key]), key
        assert not torch.equal(a[key], other[key]), key
    torch.testing.assert_close(a["attention.query_groups"],
                               a["attention.heads"].reshape(4, 2, 2).sum(-1))


def test_magnitude_scores_do_not_depend_on_the_layout():
    reference = single_run()[1]["base_magnitude"]
    for rank in layout_run():
        for name in ("tp2", "pp2", "dp2"):
            for key, ref in reference.items():
                torch.testing.assert_close(rank[f"{name}_magnitude"][key], ref, rtol=1e-5,
                                           atol=1e-6, msg=lambda msg: f"{name} {key}: {msg}")


def test_projected_head_norms_match_the_heads_projected_outputs():
    torch.manual_seed(0)
    s, b, heads, hn, hidden = 5, 3, 4, 8, 24
    x = torch.randn(s, b, heads * hn)
    w = torch.randn(hidden, heads * hn)
    w[:, 2 * hn:3 * hn] = 0  # head 2 writes nothing to the residual stream
    got = agg.projected_head_norms(x, w, hn)  # [s, b, heads]
    want = torch.stack([(x[..., h * hn:(h + 1) * hn] @ w[:, h * hn:(h + 1) * hn].T).norm(dim=-1)
                        for h in range(heads)], dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (got[..., 2] == 0).all() and (agg.head_norms(x, hn)[..., 2] > 0).all()
    # TP: each rank's row-parallel shard holds its heads' columns over the full hidden size
    halves = [agg.projected_head_norms(x[..., r * 2 * hn:(r + 1) * 2 * hn],
                                       w[:, r * 2 * hn:(r + 1) * 2 * hn], hn) for r in (0, 1)]
    torch.testing.assert_close(torch.cat(halves, dim=-1), got)


def test_importance_source_is_validated():
    with pytest.raises(ConfigError) as e:
        ImportanceConfig(source="gradient")
    assert e.value.field == "importance.source"


@pytest.mark.timeout(120)
def test_a_split_share_without_documents_is_refused_before_it_hangs(tmp_path, monkeypatch):
    """The 0.1% test share of the default '949,50,1' gets no document of a 200-document
    corpus; megatron would build that split anyway (for 0 samples) and never return."""
    from megatron_minitron.config.data import DataConfig
    from megatron_minitron.data import corpus
    from megatron_minitron.data.datasets import build_datasets
    from megatron_minitron.data.preprocess import preprocess
    from megatron_minitron.data.tokenizer import ByteTokenizer

    monkeypatch.setenv(corpus.CACHE_ENV, str(tmp_path / "cache"))
    docs = tmp_path / "docs.jsonl"
    docs.write_text("".join(f'{{"text": "document {k} " }}\n' for k in range(200)))
    prefix = preprocess([str(docs)], str(tmp_path / "docs"), ByteTokenizer(),
                        progress=False).output_prefix
    with pytest.raises(ConfigError) as e:
        build_datasets(DataConfig(paths=[prefix], seq_length=8), ByteTokenizer(), (4, 0, 0), 1)
    assert e.value.field == "data.split" and "'949,50,0'" in str(e.value)
    calib = build_datasets(DataConfig(paths=[prefix], seq_length=8, split="949,50,0"),
                           ByteTokenizer(), (4, 0, 0), 1)[0]
    assert len(calib) >= 4


# ---- Transformer-Engine layer spec (GPU) ---------------------------------------------------

TE_NORMS = {"input_layernorm.weight": "self_attention.linear_qkv.layer_norm_weight",
            "pre_mlp_layernorm.weight": "mlp.linear_fc1.layer_norm_weight"}


def _local_and_te_scores():
    """Spawned: the same weights in the local and the TE spec, scored by both sources."""
    from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
    from megatron_minitron.importance.baselines import magnitude_scores
    from megatron_minitron.importance.runner import compute_importance
    from megatron_minitron.models.builder import build_model, unwrap
    from megatron_minitron.runtime.distributed import initialize

    parallel, m = ParallelConfig(), model_cfg()
    runtime = lambda impl: RuntimeConfig(device="cuda", transformer_impl=impl,  # noqa: E731
                                         precision="fp32")
    ctx = initialize(parallel, runtime("local"))
    cfg = ImportanceConfig(num_samples=NUM_BATCHES * MBS, micro_batch_size=MBS, depth_loss=False)
    out, sd = {}, None
    for impl in ("local", "transformer_engine"):
        chunks = build_model(m, parallel, runtime(impl), ctx.device)
        gpt = unwrap(chunks[0])
        if sd is None:
            sd = {k: v for k, v in gpt.state_dict().items() if torch.is_tensor(v)}
        else:  # TE keeps the two per-layer norms inside linear_qkv / linear_fc1
            renamed = {next((k.replace(a, b) for a, b in TE_NORMS.items() if k.endswith(a)), k): v
                       for k, v in sd.items()}
            missing, unexpected = gpt.load_state_dict(renamed, strict=False)
            assert not unexpected and all(k.endswith("_extra_state") for k in missing), \
                (missing, unexpected)
        scores = compute_importance(chunks, m, cfg, batches(), ctx).tensors
        scores.update({f"magnitude.{k}": v for k, v in
                       magnitude_scores(chunks, m, ctx).tensors.items()})
        out[impl] = {k: v.float().cpu() for k, v in scores.items()}
    return out


@pytest.mark.gpu
def test_transformer_engine_spec_scores_like_the_local_spec():
    """TE fuses input_layernorm / pre_mlp_layernorm into linear_qkv / linear_fc1 and never
    materialises their output: the hooks recompute it from the fused linear's input and
    layer_norm_weight, so the channel (and every other) score must match the local spec's."""
    pytest.importorskip("transformer_engine")
    out = run_distributed(_local_and_te_scores, 1)[0]
    assert out["local"].keys() == out["transformer_engine"].keys()
    for key, ref in out["local"].items():  # TE may run fp32 GEMMs in TF32
        torch.testing.assert_close(out["transformer_engine"][key], ref, rtol=2e-3, atol=1e-4,
                                   msg=lambda msg: f"{key}: {msg}")
