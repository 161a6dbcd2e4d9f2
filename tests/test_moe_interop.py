"""Mixture-of-experts models from Hugging Face (Mixtral, Qwen2-MoE): logits equal transformers'
at TP=1, EP=2, TP=2 and PP=2, the fp32 round trip is bit-exact, and bad MoE configs are refused
by name."""

import json

import pytest
from hf_fixtures import assert_same_weights, convert_all, random_hf_model
import torch

from distributed import run_distributed
from megatron_minitron.checkpoint import hf_keymap as keymap
from megatron_minitron.checkpoint.hf import mcore_to_hf
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig

VOCAB, SEQ = 100, 12
TINY = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5,
            num_experts_per_tok=2, tie_word_embeddings=False)
FAMILIES = {
    # HF: softmax over all experts, top-2, renormalised
    "mixtral": ("mixtral", dict(TINY, num_local_experts=4, intermediate_size=48,
                                sliding_window=None)),
    # HF: top-2 of the full softmax, not renormalised; sigmoid-gated shared expert; QKV bias
    "qwen2_moe": ("qwen2_moe", dict(TINY, num_experts=4, moe_intermediate_size=24,
                                    shared_expert_intermediate_size=40, intermediate_size=56,
                                    norm_topk_prob=False)),
    "qwen2_moe_norm": ("qwen2_moe", dict(TINY, num_experts=4, moe_intermediate_size=24,
                                         shared_expert_intermediate_size=40,
                                         intermediate_size=56, norm_topk_prob=True)),
}
if "qwen3" in keymap.ARCHITECTURES:  # q/k norms: the dense Qwen3 map (issue 16's families)
    # HF: top-2 of the full softmax, renormalised; q/k RMSNorm; no shared expert
    FAMILIES["qwen3_moe"] = ("qwen3_moe", dict(TINY, num_experts=4, moe_intermediate_size=24,
                                               intermediate_size=56, norm_topk_prob=True,
                                               head_dim=8))


def _make_hf(name: str, folder):
    model_type, fields = FAMILIES[name]
    return random_hf_model(model_type, fields, sorted(FAMILIES).index(name) + 10, folder, std=0.1)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """name -> (HF folder, our checkpoint, input ids, HF fp32 logits)."""
    return convert_all(tmp_path_factory.mktemp("moe_interop"), FAMILIES, _make_hf, VOCAB, SEQ, 0)


def _forward_logits(tp: int, pp: int, ep: int, ckpts, ids):
    """Full-vocab logits of each checkpoint (None on ranks without the last stage)."""
    from test_hf_interop import _forward

    from megatron_minitron.checkpoint import dist as dist_ckpt
    from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import initialize

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp,
                              expert_model_parallel_size=ep)
    runtime = RuntimeConfig(device="cpu", transformer_impl="local", precision="fp32")
    ctx = initialize(parallel, runtime)
    out = []
    for path in ckpts:
        cfg = dist_ckpt.read_header(str(path)).model
        model = build_model(cfg, parallel, runtime, ctx.device)[0].eval()
        dist_ckpt.load(str(path), [model], ctx=ctx)
        out.append(_forward(model, cfg, ids, ctx))
    return out


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def test_config_maps_routing_semantics(converted):
    from megatron_minitron.checkpoint.dist import read_header

    mixtral = read_header(str(converted["mixtral"][1])).model
    assert (mixtral.num_moe_experts, mixtral.moe_router_topk, mixtral.moe_ffn_hidden_size) == (
        4, 2, 48)
    assert not mixtral.moe_router_pre_softmax
    assert mixtral.moe_shared_expert_intermediate_size is None
    qwen = read_header(str(converted["qwen2_moe"][1])).model
    assert qwen.moe_router_pre_softmax and qwen.moe_shared_expert_gate and qwen.add_qkv_bias
    assert (qwen.ffn_hidden_size, qwen.moe_ffn_hidden_size,
            qwen.moe_shared_expert_intermediate_size) == (56, 24, 40)
    assert not read_header(str(converted["qwen2_moe_norm"][1])).model.moe_router_pre_softmax


@pytest.mark.parametrize("name", list(FAMILIES))
def test_parity_tp1(converted, name):
    from megatron_minitron.runtime.distributed import teardown

    _, ckpt, ids, hf_logits = converted[name]
    try:
        (logits,) = _forward_logits(1, 1, 1, [ckpt], ids)
    finally:
        teardown()
    print(f"\n{name} TP=1 logits rel diff {_rel(logits, hf_logits):.2e}")
    assert _rel(logits, hf_logits) < 1e-4


@pytest.mark.parametrize("tp,pp,ep", [(1, 1, 2), (2, 1, 1), (1, 2, 1)])
def test_parity_ep2_tp2_pp2(converted, tp, pp, ep):
    """The TP=1 checkpoint loads resharded over experts, tensor and pipeline ranks."""
    names = list(FAMILIES)
    ids = converted[names[0]][2]
    per_rank = run_distributed(_forward_logits, 2, tp, pp, ep, [converted[n][1] for n in names],
                               ids)
    for i, name in enumerate(names):
        logits = per_rank[-1][i]
        rel = _rel(logits, converted[name][3])
        print(f"\n{name} TP={tp} PP={pp} EP={ep} logits rel diff {rel:.2e}")
        assert rel < 1e-4, name
        if pp == 1:
            assert torch.equal(per_rank[0][i], logits)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "qwen2_moe_norm"])
def test_round_trip_hf_mcore_hf(converted, name, tmp_path):
    from transformers import AutoModelForCausalLM

    hf_dir, ckpt, ids, hf_logits = converted[name]
    out = mcore_to_hf(str(ckpt), str(tmp_path / "hf"), dtype="float32")
    assert_same_weights(hf_dir, out)
    c0, c1 = (json.loads((d / "config.json").read_text()) for d in (hf_dir, out))
    experts = [c.get("num_local_experts") or c.get("num_experts") for c in (c0, c1)]
    assert experts[0] == experts[1] == 4
    moe_keys = ("architectures", "model_type", "num_experts_per_tok", "intermediate_size",
                "moe_intermediate_size", "shared_expert_intermediate_size", "norm_topk_prob", "router_aux_loss_coef")
    assert {k: c0.get(k) for k in moe_keys} == {k: c1.get(k) for k in moe_keys}
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    with torch.no_grad():
        assert torch.equal(model.eval()(ids).logits, hf_logits)


def test_moe_config_checks_and_parameter_count():
    dense = dict(hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, num_layers=2,
                 vocab_size=100)
    with pytest.raises(ConfigError) as e:
        ModelConfig(**dense, num_moe_experts=4, moe_router_topk=5)
    assert e.value.field == "model.moe_router_topk"
    with pytest.raises(ConfigError) as e:
        ModelConfig(**dense, moe_shared_expert_intermediate_size=8)
    assert e.value.field == "model.moe_shared_expert_intermediate_size"
    moe = ModelConfig(**dense, num_moe_experts=4, moe_ffn_hidden_size=24,
                      moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True)
    per_layer_mlp = 4 * 32 + 4 * 3 * 32 * 24 + 3 * 32 * 40 + 32
    dense_mlp = 3 * 32 * 48
    assert moe.num_parameters() - ModelConfig(**dense).num_parameters() == 2 * (
        per_layer_mlp - dense_mlp)
    from megatron_minitron.config.moe import num_active_parameters

    assert moe.num_parameters() - num_active_parameters(moe) == 2 * 2 * 3 * 32 * 24
    assert num_active_parameters(ModelConfig(**dense)) == ModelConfig(**dense).num_parameters()


def test_built_model_has_the_counted_parameters():
    from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import initialize, teardown

    cfg = ModelConfig(hidden_size=32, num_attention_heads=4, ffn_hidden_size=48, num_layers=2,
                      vocab_size=100, num_moe_experts=4, moe_ffn_hidden_size=24,
                      moe_shared_expert_intermediate_size=40, moe_shared_expert_gate=True)
    runtime = RuntimeConfig(device="cpu", transformer_impl="local", precision="fp32")
    try:
        ctx = initialize(ParallelConfig(), runtime)
        (model,) = build_model(cfg, ParallelConfig(), runtime, ctx.device)
        assert sum(p.numel() for p in model.parameters()) == cfg.num_parameters()
    finally:
        teardown()


def test_bad_moe_inputs_are_refused_by_name(converted, tmp_path):
    hf_dir = converted["qwen2_moe"][0]
    cfg = json.loads((hf_dir / "config.json").read_text())
    with pytest.raises(ConfigError) as e:
        keymap.model_config_from_hf(dict(cfg, mlp_only_layers=[1]), "c.json")
    assert e.value.field == "c.json:mlp_only_layers"
    with pytest.raises(ConfigError) as e:
        keymap.model_config_from_hf(dict(cfg, model_type="dbrx"), "c.json")
    assert e.value.field == "c.json:model_type"
    mixtral = keymap.model_config_from_hf(
        json.loads((converted["mixtral"][0] / "config.json").read_text()))
    assert "shared expert" not in (keymap.hf_export_problem(mixtral) or "")
    assert "no experts" in keymap.hf_export_problem(mixtral, "mistral")
    qwen = keymap.model_config_from_hf(cfg)
    assert "no shared expert" in keymap.hf_export_problem(qwen, "mixtral")
    from megatron_minitron.config.parallel import ParallelConfig
    from megatron_minitron.models.moe import moe_transformer_kwargs

    with pytest.raises(ConfigError) as e:
        moe_transformer_kwargs(qwen, ParallelConfig(expert_model_parallel_size=3))
    assert e.value.field == "parallel.expert_model_parallel_size"
