"""Hugging Face names of mixture-of-experts models (Mixtral, Qwen2-MoE, Qwen3-MoE): their
config.json MoE fields <-> our moe_* fields, and their per-expert tensors <-> megatron-core's
MoE layer (router, SequentialMLP local experts, gated shared expert). hf_keymap asks this
module for the MoE part of each conversion; attention, norms and embeddings are the dense
families' maps.

Routing semantics (both checked against transformers in tests/test_moe_interop.py):
  * Mixtral: softmax over all experts, top-k, renormalised = megatron's softmax over the top-k
    logits (moe_router_pre_softmax=false). Qwen2-MoE with norm_topk_prob=true: the same.
  * Qwen2-MoE with norm_topk_prob=false: top-k of the full softmax, not renormalised =
    megatron's moe_router_pre_softmax=true. Its shared expert is scaled by
    sigmoid(hidden @ shared_expert_gate) = megatron's moe_shared_expert_gate.
  * Qwen3-MoE: as Qwen2-MoE without the shared expert; its q/k RMSNorm and attention bias
    are the dense qwen3 map's (megatron's qk_layernorm).
Refused: Qwen-MoE dense layers between MoE layers (mlp_only_layers, decoder_sparse_step != 1).

On disk transformers 5 still writes (and reads) the per-expert layout used here:
`experts.{j}.w1/w3/w2` (Mixtral) and `experts.{j}.gate_proj/up_proj/down_proj` (Qwen-MoE).
"""

import dataclasses
from typing import Any, Dict, List, Optional, Tuple

from megatron_minitron.config.errors import ConfigError

ARCHITECTURES = {"mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM"}
DENSE_FAMILY = {"mixtral": "mistral", "qwen2_moe": "qwen2", "qwen3_moe": "qwen3"}
"""The dense family whose attention, norms, RoPE and config checks each MoE family shares."""
KEPT_HF_FIELDS = {"mixtral": ("sliding_window", "max_position_embeddings",
                              "router_jitter_noise")}
"""config.json fields recorded at import and given back at export (hf_keymap.KEPT_HF_FIELDS)."""

# (megatron name, HF names, kind, HF shapes) rows; hf_keymap turns them into TensorMaps.
MapRow = Tuple[str, Tuple[str, ...], str, Tuple[Tuple[int, ...], ...]]


def dense_view(hf: Dict[str, Any]) -> Dict[str, Any]:
    """config.json of an MoE model as its dense family reads it (same attention and RoPE)."""
    model_type = hf["model_type"]
    view = dict(hf, model_type=DENSE_FAMILY[model_type])
    if model_type == "qwen2_moe" and not hf.get("use_sliding_window"):
        view.pop("sliding_window", None)
    return view


def _experts_field(hf: Dict[str, Any], source: str) -> int:
    for key in ("num_local_experts", "num_experts"):
        if hf.get(key):
            return int(hf[key])
    raise ConfigError(f"{source}:num_local_experts", "missing", "use a complete MoE config.json")


def with_experts(dense, hf: Dict[str, Any], source: str):
    """The dense ModelConfig of an MoE config.json with its moe_* fields filled in."""
    model_type = hf["model_type"]
    topk = int(hf.get("num_experts_per_tok", 2))
    aux = float(hf.get("router_aux_loss_coef", 0.0) or 0.0)
    if model_type == "mixtral":
        return dataclasses.replace(
            dense, num_moe_experts=_experts_field(hf, source), moe_router_topk=topk,
            moe_ffn_hidden_size=dense.ffn_hidden_size, moe_router_pre_softmax=False,
            moe_aux_loss_coeff=aux)
    if hf.get("mlp_only_layers") or int(hf.get("decoder_sparse_step", 1)) != 1:
        raise ConfigError(f"{source}:mlp_only_layers", "dense MLP layers between the MoE layers "
                          "are not supported", "convert a model whose every layer is MoE "
                          "(mlp_only_layers=[], decoder_sparse_step=1)")
    if "moe_intermediate_size" not in hf:
        raise ConfigError(f"{source}:moe_intermediate_size", "missing",
                          "use a complete Qwen-MoE config.json")
    if model_type == "qwen3_moe":  # q/k norms and attention_bias: the dense qwen3 map's
        return dataclasses.replace(
            dense, num_moe_experts=_experts_field(hf, source), moe_router_topk=topk,
            moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
            moe_router_pre_softmax=not hf.get("norm_topk_prob", False), moe_aux_loss_coeff=aux)
    shared = int(hf.get("shared_expert_intermediate_size") or 0)
    if shared < 1:
        raise ConfigError(f"{source}:shared_expert_intermediate_size", "Qwen2-MoE without a "
                          "shared expert is not supported", "convert a model with one")
    return dataclasses.replace(
        dense, num_moe_experts=_experts_field(hf, source), moe_router_topk=topk,
        moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
        moe_router_pre_softmax=not hf.get("norm_topk_prob", False),
        moe_shared_expert_intermediate_size=shared, moe_shared_expert_gate=True,
        add_qkv_bias=bool(hf.get("qkv_bias", True)), moe_aux_loss_coeff=aux)


def default_model_type(cfg) -> str:
    if cfg.moe_shared_expert_intermediate_size is not None:
        return "qwen2_moe"
    return "qwen3_moe" if cfg.qk_layernorm else "mixtral"


def export_problem(cfg, model_type: str) -> Optional[str]:
    """Why an MoE `cfg` cannot be written as HF `model_type` (None: it can)."""
    if model_type not in ARCHITECTURES:
        return (f"model_type {model_type!r} has no experts; an MoE model exports as one of "
                f"{sorted(ARCHITECTURES)}")
    shared, gate = cfg.moe_shared_expert_intermediate_size, cfg.moe_shared_expert_gate
    if model_type == "mixtral":
        checks = [(shared is not None, "Mixtral has no shared expert"),
                  (cfg.moe_router_pre_softmax, "Mixtral renormalises the top-k probabilities "
                   "(moe_router_pre_softmax must be false)"),
                  (cfg.add_qkv_bias, "Mixtral has no QKV biases")]
    elif model_type == "qwen3_moe":
        checks = [(shared is not None, "Qwen3-MoE has no shared expert"),
                  (not cfg.qk_layernorm, "Qwen3-MoE normalises q and k "
                   "(qk_layernorm)")]
    else:
        checks = [(shared is None or not gate, "Qwen2-MoE has a gated shared expert")]
    return next((why for bad, why in checks if bad), None)


def hf_config_fields(cfg, model_type: str) -> Dict[str, Any]:
    """The MoE fields of config.json."""
    out: Dict[str, Any] = {"num_experts_per_tok": cfg.moe_router_topk,
                           "router_aux_loss_coef": cfg.moe_aux_loss_coeff,
                           "output_router_logits": False}
    if model_type == "mixtral":
        out.update(num_local_experts=cfg.num_moe_experts,
                   intermediate_size=cfg.moe_ffn_hidden_size)
    else:
        out.update(num_experts=cfg.num_moe_experts, moe_intermediate_size=cfg.moe_ffn_hidden_size,
                   norm_topk_prob=not cfg.moe_router_pre_softmax, decoder_sparse_step=1,
                   mlp_only_layers=[])
    if model_type == "qwen3_moe":  # transformers 5 writes num_local_experts, 4.x reads num_experts
        out["num_local_experts"] = cfg.num_moe_experts
    if model_type == "qwen2_moe":
        out.update(shared_expert_intermediate_size=cfg.moe_shared_expert_intermediate_size,
                   qkv_bias=cfg.add_qkv_bias)
    return out


def layer_maps(cfg, model_type: str, layer: int) -> List[MapRow]:
    """The MoE MLP tensors of one layer (router, every expert, shared expert and gate)."""
    h, f = cfg.hidden_size, cfg.moe_ffn_hidden_size
    m = f"decoder.layers.{layer}.mlp."
    if model_type == "mixtral":
        hm = f"model.layers.{layer}.block_sparse_moe."
        names = {"gate": "w1", "up": "w3", "down": "w2"}
    else:
        hm = f"model.layers.{layer}.mlp."
        names = {"gate": "gate_proj", "up": "up_proj", "down": "down_proj"}
    rows: List[MapRow] = [(m + "router.weight", (hm + "gate.weight",), "copy",
                           ((cfg.num_moe_experts, h),))]
    for j in range(cfg.num_moe_experts):
        e, he = f"{m}experts.local_experts.{j}.", f"{hm}experts.{j}."
        rows += [(e + "linear_fc1.weight", (f"{he}{names['gate']}.weight",
                                            f"{he}{names['up']}.weight"), "fc1", ((f, h),) * 2),
                 (e + "linear_fc2.weight", (f"{he}{names['down']}.weight",), "copy", ((h, f),))]
    fs = cfg.moe_shared_expert_intermediate_size
    if fs is not None:
        s, hs = m + "shared_experts.", hm + "shared_expert."
        rows += [(s + "linear_fc1.weight", (hs + "gate_proj.weight", hs + "up_proj.weight"),
                  "fc1", ((fs, h),) * 2),
                 (s + "linear_fc2.weight", (hs + "down_proj.weight",), "copy", ((h, fs),))]
        if cfg.moe_shared_expert_gate:
            rows.append((s + "gate_weight", (hm + "shared_expert_gate.weight",), "copy",
                         ((1, h),)))
    return rows
