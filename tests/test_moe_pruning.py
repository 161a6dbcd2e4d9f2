"""Mixture-of-experts importance and pruning: planted dead experts and neurons rank last and are
removed first, keeping everything keeps the logits, removing dead neurons keeps the logits,
scores at TP=2, EP=2 and PP=2 equal TP=1, and the expert-pruned checkpoint loads at TP=2 and exports
to Hugging Face with the same logits."""

import functools
import tempfile

import pytest
import torch

from distributed import run_distributed
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.importance import ImportanceConfig
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.prune import PruneConfig, PruneTarget

# Qwen2-MoE-like: top-2 of the full softmax (not renormalised), gated shared expert
MODEL = dict(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4,
             num_query_groups=2, vocab_size=100, layernorm_epsilon=1e-6, num_moe_experts=4,
             moe_router_topk=2, moe_ffn_hidden_size=24, moe_router_pre_softmax=True,
             moe_shared_expert_intermediate_size=16, moe_shared_expert_gate=True)
SEQ, MBS, NUM_BATCHES = 16, 2, 4
DEAD_EXPERT = {0: 2, 1: 0}  # layer -> expert whose linear_fc2 is zero
DEAD_NEURONS = [1, 5, 20]  # of every expert of every layer: zero linear_fc1 rows
DEAD_SHARED = [0, 9]  # of every shared expert


def model_cfg() -> ModelConfig:
    return ModelConfig(**MODEL)


def batches(dp_rank: int = 0, dp_size: int = 1):
    g = torch.Generator().manual_seed(0)
    out = []
    for _ in range(NUM_BATCHES):
        ids = torch.randint(0, MODEL["vocab_size"], (MBS, SEQ + 1), generator=g)
        out.append({"tokens": ids[:, :-1], "labels": ids[:, 1:], "loss_mask": torch.ones(MBS, SEQ),
                    "position_ids": torch.arange(SEQ).expand(MBS, -1).contiguous()})
    mine = out[dp_rank::dp_size]
    return lambda: iter(mine)


def importance_cfg() -> ImportanceConfig:
    return ImportanceConfig(num_samples=NUM_BATCHES * MBS, micro_batch_size=MBS,
                            depth_cosine=False, depth_loss=False)


def plant(sd, m: ModelConfig):
    sd = {k: v.clone() if torch.is_tensor(v) else v for k, v in sd.items()}
    f, fs = m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size
    for i in range(m.num_layers):
        p = f"decoder.layers.{i}.mlp."
        sd[f"{p}experts.local_experts.{DEAD_EXPERT[i]}.linear_fc2.weight"].zero_()
        for e in range(m.num_moe_experts):  # silu(0) * 0 = 0 enters linear_fc2
            sd[f"{p}experts.local_experts.{e}.linear_fc1.weight"][
                DEAD_NEURONS + [f + j for j in DEAD_NEURONS]] = 0
        sd[f"{p}shared_experts.linear_fc1.weight"][DEAD_SHARED + [fs + j for j in DEAD_SHARED]] = 0
    return sd


def _init(tp=1, pp=1, ep=1):
    from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
    from megatron_minitron.runtime.distributed import initialize

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              expert_model_parallel_size=ep)
    runtime = RuntimeConfig(device="cpu", transformer_impl="local", precision="fp32")
    return initialize(parallel, runtime), parallel, runtime


def _logits(path, ctx, parallel, runtime):
    """Full-vocabulary logits of a checkpoint on this rank's layout (PP=1)."""
    import torch.distributed as dist

    from megatron_minitron.checkpoint.dist import load, read_header
    from megatron_minitron.models.builder import build_model, unwrap

    chunks = build_model(read_header(path).model, parallel, runtime, ctx.device)
    load(path, chunks, ctx=ctx)
    tokens = next(batches()())["tokens"]
    pos = torch.arange(tokens.shape[1]).expand(tokens.shape[0], -1)
    with torch.no_grad():
        local = unwrap(chunks[0]).eval()(tokens, pos, None)  # [b, s, V/tp]
    parts = [torch.empty_like(local) for _ in range(ctx.tp_size)]
    dist.all_gather(parts, local.contiguous(), group=ctx.tp_group)
    return torch.cat(parts, dim=-1)[..., :MODEL["vocab_size"]]


def _single(root: str):
    from megatron_minitron.checkpoint.dist import CheckpointHeader, read_header, save
    from megatron_minitron.checkpoint.hf import mcore_to_hf
    from megatron_minitron.importance.runner import compute_importance
    from megatron_minitron.importance.scores import save_scores
    from megatron_minitron.models.builder import build_model, unwrap
    from megatron_minitron.pruning.slicing import prune_checkpoint

    ctx, parallel, runtime = _init()
    m = model_cfg()
    chunks = build_model(m, parallel, runtime, ctx.device)
    gpt = unwrap(chunks[0])
    gpt.load_state_dict(plant(gpt.state_dict(), m))
    save(f"{root}/planted", 0, chunks, CheckpointHeader(model=m), ctx=ctx)
    scores = compute_importance(chunks, m, importance_cfg(), batches(), ctx)
    save_scores(f"{root}/planted.safetensors", scores)
    out = {"scores": scores.tensors, "sd": {k: v.clone() for k, v in gpt.state_dict().items()
                                            if torch.is_tensor(v)}}
    out["logits"] = _logits(f"{root}/planted", ctx, parallel, runtime)

    def prune(name, **target):
        path = prune_checkpoint(f"{root}/planted", f"{root}/planted.safetensors",
                                PruneConfig(target=PruneTarget(**target)), f"{root}/{name}",
                                ctx, runtime)
        return path, _logits(str(path), ctx, parallel, runtime)

    _, out["identity_logits"] = prune("identity")
    f, fs = m.moe_ffn_hidden_size, m.moe_shared_expert_intermediate_size
    _, out["dead_neurons_logits"] = prune(
        "neurons", moe_ffn_hidden_size=f - len(DEAD_NEURONS),
        moe_shared_expert_intermediate_size=fs - len(DEAD_SHARED))
    path, out["experts_logits"] = prune("experts", num_moe_experts=3)
    out["experts_model"] = read_header(str(path)).model
    chunks = build_model(out["experts_model"], parallel, runtime, ctx.device)
    from megatron_minitron.checkpoint.dist import load

    load(str(path), chunks, ctx=ctx)
    out["experts_sd"] = {k: v.clone() for k, v in unwrap(chunks[0]).state_dict().items()
                         if torch.is_tensor(v)}
    hf = mcore_to_hf(str(path), f"{root}/experts_hf", dtype="float32")
    out["experts_path"], out["experts_hf"] = str(path), str(hf)
    return out


@functools.lru_cache(maxsize=None)
def single_run():
    root = tempfile.mkdtemp(prefix="minitron_moe_")
    return root, run_distributed(_single, 1, root)[0]


def _layouts(root: str, pruned: str):
    from megatron.core import parallel_state as ps

    from megatron_minitron.checkpoint.dist import load
    from megatron_minitron.importance.runner import compute_importance
    from megatron_minitron.models.builder import build_model

    out = {}
    for name, tp, pp, ep in (("tp2", 2, 1, 1), ("ep2", 1, 1, 2), ("pp2", 1, 2, 1)):
        ctx, parallel, runtime = _init(tp=tp, pp=pp, ep=ep)
        chunks = build_model(model_cfg(), parallel, runtime, ctx.device)
        load(f"{root}/planted", chunks, ctx=ctx)
        out[name] = compute_importance(chunks, model_cfg(), importance_cfg(),
                                       batches(ctx.dp_rank, ctx.dp_size), ctx).tensors
        if name == "tp2":  # 3 experts do not split over EP=2 (refused by name)
            out["pruned_logits_tp2"] = _logits(pruned, ctx, parallel, runtime)
        ps.destroy_model_parallel()
    return out


@functools.lru_cache(maxsize=None)
def layout_run():
    root, single = single_run()
    return run_distributed(_layouts, 2, root, single["experts_path"])


def test_planted_expert_and_neurons_rank_last():
    _, out = single_run()
    s, m = out["scores"], model_cfg()
    assert s["moe.experts"].shape == (m.num_layers, m.num_moe_experts)
    assert s["moe.neurons"].shape == (m.num_layers, m.num_moe_experts, m.moe_ffn_hidden_size)
    for i, dead in DEAD_EXPERT.items():
        assert s["moe.experts"][i, dead] == 0
        assert (s["moe.experts"][i][torch.arange(4) != dead] > 0).all()
        # tokens are still routed to it: its output, not its traffic, makes it useless
        assert s["moe.expert_tokens"][i, dead] > 0
        assert s["moe.neurons"][i, :, DEAD_NEURONS].abs().max() == 0
        assert s["moe.shared_neurons"][i, DEAD_SHARED].abs().max() == 0
    routed = s["moe.expert_tokens"].sum(dim=1)
    assert torch.equal(routed, torch.full((2,), float(NUM_BATCHES * MBS * SEQ * 2)))


def test_keeping_everything_and_dropping_dead_neurons_keep_the_logits():
    _, out = single_run()
    assert torch.equal(out["identity_logits"], out["logits"])
    assert torch.allclose(out["dead_neurons_logits"], out["logits"], atol=1e-5, rtol=0)


def test_expert_pruning_removes_the_planted_expert_with_its_router_row():
    _, out = single_run()
    assert out["experts_model"].num_moe_experts == 3
    src, pruned = out["sd"], out["experts_sd"]
    for i, dead in DEAD_EXPERT.items():
        kept = [e for e in range(4) if e != dead]
        p = f"decoder.layers.{i}.mlp."
        assert torch.equal(pruned[p + "router.weight"], src[p + "router.weight"][kept])
        for new, e in enumerate(kept):
            for w in ("linear_fc1.weight", "linear_fc2.weight"):
                assert torch.equal(pruned[f"{p}experts.local_experts.{new}.{w}"],
                                   src[f"{p}experts.local_experts.{e}.{w}"])
    assert not torch.equal(out["experts_logits"], out["logits"])  # routing changed


def test_pruned_moe_exports_to_hf_with_the_same_logits():
    from transformers import AutoModelForCausalLM

    _, out = single_run()
    model = AutoModelForCausalLM.from_pretrained(out["experts_hf"]).eval()
    assert type(model).__name__ == "Qwen2MoeForCausalLM"
    with torch.no_grad():
        hf = model(next(batches()())["tokens"]).logits
    rel = ((hf - out["experts_logits"]).abs().max() / hf.abs().max()).item()
    assert rel < 1e-4


def test_scores_at_tp2_ep2_and_pp2_equal_tp1():
    _, single = single_run()
    per_rank = layout_run()
    for name in ("tp2", "ep2", "pp2"):
        for rank in per_rank:
            for key, ref in single["scores"].items():
                assert torch.allclose(rank[name][key], ref, rtol=1e-5, atol=1e-6), (name, key)


def test_expert_pruned_checkpoint_loads_at_tp2():
    _, single = single_run()
    for rank in layout_run():
        assert torch.allclose(rank["pruned_logits_tp2"], single["experts_logits"], atol=1e-5)


def test_moe_targets_are_checked_by_name():
    from megatron_minitron.pruning.plan import resolve_target

    m = model_cfg()
    for target, field in ((dict(num_moe_experts=1), "num_moe_experts"),
                          (dict(num_moe_experts=5), "num_moe_experts"),
                          (dict(ffn_hidden_size=32), "ffn_hidden_size")):
        with pytest.raises(ConfigError) as e:
            resolve_target(m, PruneConfig(target=PruneTarget(**target)))
        assert e.value.field == f"prune.target.{field}"
    with pytest.raises(ConfigError) as e:
        resolve_target(m, PruneConfig(target=PruneTarget(moe_ffn_hidden_size=23),
                                      tensor_model_parallel_size=2))
    assert e.value.field == "prune.target.moe_ffn_hidden_size"
    dense = ModelConfig(num_layers=2, hidden_size=32, ffn_hidden_size=48, num_attention_heads=4)
    with pytest.raises(ConfigError) as e:
        resolve_target(dense, PruneConfig(target=PruneTarget(num_moe_experts=2)))
    assert e.value.field == "prune.target.num_moe_experts"
    t = resolve_target(m, PruneConfig(target=PruneTarget(num_moe_experts=2,
                                                         moe_ffn_hidden_size=16)))
    assert (t.num_moe_experts, t.moe_ffn_hidden_size) == (2, 16)
    assert t.num_parameters() < m.num_parameters()
