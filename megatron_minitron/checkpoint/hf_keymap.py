"""The only module that knows Hugging Face names: config.json <-> ModelConfig, and HF tensor
names <-> megatron-core GPTModel names (local layer spec, TP=1/PP=1 full tensors).

Supported families: llama (incl. Llama 3.1 rope_scaling), mistral, qwen2 (QKV bias), qwen3
(per-head q/k RMSNorm: megatron-core's qk_layernorm), phi3 (fused qkv_proj and gate_up_proj,
split into megatron's per-group QKV interleave on import and fused back on export), the MoE
families (hf_moe.py) and Gemma 1, 2 and 3 text (hf_gemma.py; their modules: models/gemma.py).
RoPE: HF applies rotate_half to the two halves of each head, which is megatron-core's default
rotary_interleaved=False, so q/k rows need no permutation.
"""

from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from megatron_minitron.checkpoint import hf_gemma, hf_moe
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig, RopeScaling

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "phi3": "Phi3ForCausalLM", **hf_moe.ARCHITECTURES, **hf_gemma.ARCHITECTURES}
ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu"}
TOKEN_ID_FIELDS = ("bos_token_id", "eos_token_id", "pad_token_id")
IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)
"""Buffers some older HF checkpoints saved; recomputed from the config, never loaded."""


def _need(hf: Dict[str, Any], key: str, source: str):
    if key not in hf:
        raise ConfigError(f"{source}:{key}", "missing", "use a complete HF config.json")
    return hf[key]


def _rope(hf: Dict[str, Any], source: str) -> Tuple[float, Optional[RopeScaling]]:
    """(theta, Llama 3.1 scaling) from transformers 4.x (rope_theta + rope_scaling) or 5.x
    (rope_parameters) style config.json."""
    params = dict(hf.get("rope_parameters") or {})
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or params
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return theta, None
    if kind != "llama3":
        raise ConfigError(f"{source}:rope_scaling", f"rope_type {kind!r} is not supported",
                          "use a model with default or llama3 RoPE")
    return theta, RopeScaling(
        factor=float(scaling["factor"]), low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def model_config_from_hf(hf: Dict[str, Any], source: str = "config.json") -> ModelConfig:
    """ModelConfig for an HF config.json dict; ConfigError naming `source:field` otherwise."""
    model_type = hf.get("model_type")
    gemma = model_type in hf_gemma.ARCHITECTURES or model_type in hf_gemma.MULTIMODAL
    extra = hf_gemma.model_fields(hf, model_type, source) if gemma else {}
    if model_type not in ARCHITECTURES:
        raise ConfigError(f"{source}:model_type", f"{model_type!r} is not supported",
                          f"convert one of {sorted(ARCHITECTURES)}")
    if model_type in hf_moe.ARCHITECTURES:
        return hf_moe.with_experts(model_config_from_hf(hf_moe.dense_view(hf), source), hf, source)
    act = hf.get("hidden_act", "silu")
    if not gemma and act not in ACTIVATIONS:
        raise ConfigError(f"{source}:hidden_act", f"{act!r} is not supported",
                          f"use one of {sorted(ACTIVATIONS)}")
    if model_type == "llama" and (hf.get("attention_bias") or hf.get("mlp_bias")):
        raise ConfigError(f"{source}:attention_bias", "Llama linear biases are not supported",
                          "convert a model without attention_bias/mlp_bias")
    if model_type in ("qwen2", "qwen3") and hf.get("use_sliding_window"):
        raise ConfigError(f"{source}:use_sliding_window", "sliding-window attention is not "
                          "supported", "convert a model with use_sliding_window=false")
    if model_type == "qwen3" and hf.get("attention_bias"):
        raise ConfigError(f"{source}:attention_bias", "Qwen3 attention biases are not supported",
                          "convert a model with attention_bias=false")
    rotary = (hf.get("rope_parameters") or {}).get("partial_rotary_factor",
                                                    hf.get("partial_rotary_factor", 1.0))
    if float(rotary) != 1.0:
        raise ConfigError(f"{source}:partial_rotary_factor", f"partial RoPE ({rotary}) is not "
                          "supported", "convert a model that rotates the whole head")
    hidden, heads = _need(hf, "hidden_size", source), _need(hf, "num_attention_heads", source)
    theta, scaling = _rope(hf, source)
    max_pos = int(hf.get("max_position_embeddings", 2048))
    window = hf.get("sliding_window", 4096 if model_type == "mistral" else None) \
        if model_type in WINDOWED else None
    if window:  # full causal attention equals Mistral's sliding window up to `window` tokens
        max_pos = min(max_pos, int(window))
    fields = dict(
        num_layers=_need(hf, "num_hidden_layers", source),
        hidden_size=hidden,
        ffn_hidden_size=_need(hf, "intermediate_size", source),
        num_attention_heads=heads,
        num_query_groups=hf.get("num_key_value_heads") or heads,
        kv_channels=hf.get("head_dim") or hidden // heads,
        vocab_size=_need(hf, "vocab_size", source),
        max_position_embeddings=max_pos,
        normalization="RMSNorm",
        layernorm_epsilon=float(hf.get("rms_norm_eps", 1e-6)),
        gated_linear_unit=True,
        activation=ACTIVATIONS.get(act),
        position_embedding_type="rope",
        rotary_base=theta,
        rope_scaling=scaling,
        share_embeddings_and_output_weights=bool(hf.get("tie_word_embeddings", False)),
        add_qkv_bias=model_type == "qwen2",
        qk_layernorm=model_type == "qwen3",
    )
    return ModelConfig(**{**fields, **extra})


WINDOWED = ("mistral", "phi3", "mixtral")
"""Families whose sliding_window import caps max_position_embeddings (full causal attention
equals a sliding window up to `window` tokens) and export gives back."""
KEPT_HF_FIELDS = {"mistral": ("sliding_window", "max_position_embeddings"),
                  "phi3": ("sliding_window", "max_position_embeddings",
                           "original_max_position_embeddings"),
                  **hf_moe.KEPT_HF_FIELDS}
"""config.json fields recorded at import (header extra["hf"]) and given back at export."""


def default_model_type(cfg: ModelConfig) -> str:
    if cfg.num_moe_experts is not None:
        return hf_moe.default_model_type(cfg)
    if hf_gemma.default_model_type(cfg):
        return hf_gemma.default_model_type(cfg)
    if cfg.qk_layernorm:
        return "qwen3"
    return "qwen2" if cfg.add_qkv_bias else "llama"


def hf_export_problem(cfg: ModelConfig, model_type: Optional[str] = None) -> Optional[str]:
    """Why `cfg` cannot be written as an HF model of `model_type` (None: it can)."""
    model_type = model_type or default_model_type(cfg)
    if model_type not in ARCHITECTURES:
        return f"model_type {model_type!r} is not one of {sorted(ARCHITECTURES)}"
    if cfg.num_moe_experts is not None or model_type in hf_moe.ARCHITECTURES:
        problem = hf_moe.export_problem(cfg, model_type) if cfg.num_moe_experts else (
            f"model_type {model_type!r} needs experts (model.num_moe_experts)")
        if problem:
            return problem
        model_type = hf_moe.DENSE_FAMILY[model_type]
    gemma = hf_gemma.export_problem(cfg, model_type)
    if gemma or model_type in hf_gemma.ARCHITECTURES:
        return gemma
    checks = [
        (cfg.normalization != "RMSNorm", f"HF {sorted(ARCHITECTURES)} use RMSNorm"),
        (not cfg.gated_linear_unit, f"HF {sorted(ARCHITECTURES)} use a gated (SwiGLU) MLP"),
        (cfg.activation not in ("silu", "gelu", "relu"), f"activation {cfg.activation!r}"),
        (cfg.position_embedding_type != "rope", f"HF {sorted(ARCHITECTURES)} use RoPE"),
        (cfg.rotary_percent != 1.0, "partial RoPE (rotary_percent != 1)"),
        (cfg.add_bias_linear, "biases on every linear layer (add_bias_linear)"),
        (cfg.add_qkv_bias and model_type != "qwen2", "QKV biases need model_type qwen2"),
        (not cfg.add_qkv_bias and model_type == "qwen2" and cfg.num_moe_experts is None,
         "qwen2 always has QKV biases"),
        (cfg.qk_layernorm and model_type != "qwen3", "q/k RMSNorm (qk_layernorm) needs "
         "model_type qwen3"),
        (not cfg.qk_layernorm and model_type == "qwen3", "qwen3 always has q/k RMSNorm "
         "(qk_layernorm)"),
        (cfg.rope_scaling is not None and model_type != "llama", "rope_scaling needs llama"),
        (model_type == "llama" and cfg.hidden_size % cfg.num_attention_heads != 0,
         f"transformers' LlamaConfig rejects hidden_size {cfg.hidden_size} not divisible by "
         f"num_attention_heads {cfg.num_attention_heads}; export as model_type mistral "
         "(same math without rope_scaling) or prune heads to a divisor"),
    ]
    return next((why for bad, why in checks if bad), None)


def hf_config_from_model(cfg: ModelConfig, model_type: str, dtype: str,
                         extra: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """config.json for `cfg`, written in both transformers 4.x and 5.x RoPE styles."""
    problem = hf_export_problem(cfg, model_type)
    if problem:
        raise ConfigError("convert.model_type", f"cannot export as HF {model_type}: {problem}",
                          "fix the architecture or choose another model_type")
    rope: Dict[str, Any] = {"rope_type": "default"}
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        rope = {"rope_type": "llama3", "factor": s.factor, "low_freq_factor": s.low_freq_factor,
                "high_freq_factor": s.high_freq_factor,
                "original_max_position_embeddings": s.original_max_position_embeddings}
    hf: Dict[str, Any] = {
        "architectures": [ARCHITECTURES[model_type]],
        "model_type": model_type,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.kv_channels,
        "hidden_act": cfg.activation,
        "vocab_size": cfg.vocab_size,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.layernorm_epsilon,
        "rope_theta": cfg.rotary_base,
        "rope_scaling": rope if cfg.rope_scaling is not None else None,
        "rope_parameters": dict(rope, rope_theta=cfg.rotary_base),
        "tie_word_embeddings": cfg.share_embeddings_and_output_weights,
        "attention_dropout": cfg.attention_dropout,
        "initializer_range": cfg.init_method_std,
        "torch_dtype": dtype,
        "use_cache": True,
    }
    if model_type in hf_gemma.ARCHITECTURES:
        hf.update(hf_gemma.hf_fields(cfg, model_type))
    elif model_type == "llama":
        hf.update(attention_bias=False, mlp_bias=False)
    elif model_type in WINDOWED:
        window = (extra or {}).get("sliding_window")
        hf["sliding_window"] = window
        imported_max = (extra or {}).get("max_position_embeddings")
        if window and imported_max and cfg.max_position_embeddings == min(imported_max, window):
            hf["max_position_embeddings"] = imported_max  # import capped it at the window
    else:
        hf.update(use_sliding_window=False, sliding_window=None)
    if model_type == "qwen3":
        hf["attention_bias"] = False
    if model_type == "phi3":
        # Phi3Config's token ids default to 32000, past a small vocabulary (nn.Embedding's
        # padding_idx then fails); ids recorded at import are written just below
        hf.update({k: None for k in TOKEN_ID_FIELDS},
                  original_max_position_embeddings=(extra or {}).get(
                      "original_max_position_embeddings", hf["max_position_embeddings"]))
    for key in TOKEN_ID_FIELDS:
        if extra and extra.get(key) is not None:
            hf[key] = extra[key]
    if cfg.num_moe_experts is not None:
        hf.update(hf_moe.hf_config_fields(cfg, model_type))
        hf.update({k: (extra or {})[k] for k in KEPT_HF_FIELDS.get(model_type, ())
                   if (extra or {}).get(k) is not None and k not in hf})
    return hf


@dataclass(frozen=True)
class TensorMap:
    """One megatron tensor and the HF tensors it is made of."""

    mcore: str
    """megatron-core GPTModel state-dict name."""
    hf: Tuple[str, ...]
    """HF names, in the order `kind` joins them."""
    kind: str
    """"copy", "qkv" (megatron's per-group [q; k; v] interleave from q, k, v, or from one
    fused [q; k; v] tensor), "fc1" ([gate; up], from two tensors or one fused) or "vocab"
    (rows padded to padded_vocab_size)."""
    shapes: Tuple[Tuple[int, ...], ...] = ()
    """HF shapes, where `kind` and the name do not say them (MoE tensors); () otherwise."""


def _attention_maps(cfg: ModelConfig, model_type: str, m: str, att: str) -> List[TensorMap]:
    qkv = (att + "qkv_proj.weight",) if model_type == "phi3" else tuple(
        f"{att}{p}_proj.weight" for p in "qkv")
    maps = [TensorMap(m + "self_attention.linear_qkv.weight", qkv, "qkv"),
            TensorMap(m + "self_attention.linear_proj.weight", (att + "o_proj.weight",), "copy")]
    if cfg.add_qkv_bias:
        maps.append(TensorMap(m + "self_attention.linear_qkv.bias",
                              tuple(f"{att}{p}_proj.bias" for p in "qkv"), "qkv"))
    if cfg.qk_layernorm:  # one [hn] weight shared by all heads, in HF and in megatron
        maps += [TensorMap(m + "self_attention.q_layernorm.weight", (att + "q_norm.weight",),
                           "copy"),
                 TensorMap(m + "self_attention.k_layernorm.weight", (att + "k_norm.weight",),
                           "copy")]
    return maps


def tensor_maps(cfg: ModelConfig, model_type: Optional[str] = None) -> List[TensorMap]:
    """The maps of `cfg` written as HF `model_type` (phi3 fuses qkv and gate/up; MoE families:
    hf_moe's expert maps). None: default_model_type(cfg)."""
    model_type = model_type or default_model_type(cfg)
    maps = [TensorMap("embedding.word_embeddings.weight", ("model.embed_tokens.weight",), "vocab")]
    for i in range(cfg.num_layers):
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        fc1 = (h + "mlp.gate_up_proj.weight",) if model_type == "phi3" else (
            h + "mlp.gate_proj.weight", h + "mlp.up_proj.weight")
        norms = hf_gemma.layer_norm_maps(model_type, m, h) if model_type in \
            hf_gemma.ARCHITECTURES else [(m + "pre_mlp_layernorm.weight",
                                          h + "post_attention_layernorm.weight")]
        maps += [
            TensorMap(m + "input_layernorm.weight", (h + "input_layernorm.weight",), "copy"),
            *_attention_maps(cfg, model_type, m, h + "self_attn."),
            *(TensorMap(ours, (theirs,), "copy") for ours, theirs in norms),
        ]
        if cfg.num_moe_experts is not None:
            maps += [TensorMap(*row) for row in hf_moe.layer_maps(cfg, model_type, i)]
        else:
            maps += [TensorMap(m + "mlp.linear_fc1.weight", fc1, "fc1"),
                     TensorMap(m + "mlp.linear_fc2.weight", (h + "mlp.down_proj.weight",), "copy")]
    maps.append(TensorMap("decoder.final_layernorm.weight", ("model.norm.weight",), "copy"))
    if not cfg.share_embeddings_and_output_weights:
        maps.append(TensorMap("output_layer.weight", ("lm_head.weight",), "vocab"))
    return maps


def hf_shapes(tm: TensorMap, cfg: ModelConfig) -> List[Tuple[int, ...]]:
    """Expected shapes of tm.hf, to name a mismatch before any reshape fails."""
    h, hn, nq, ng = cfg.hidden_size, cfg.kv_channels, cfg.num_attention_heads, cfg.num_query_groups
    if tm.shapes:
        return list(tm.shapes)
    tail = (h,) if tm.mcore.endswith("weight") else ()
    if tm.kind == "qkv":
        parts = [(nq * hn, *tail), (ng * hn, *tail), (ng * hn, *tail)]
        return parts if len(tm.hf) == 3 else [((nq + 2 * ng) * hn, *tail)]
    if tm.kind == "fc1":
        return [(2 * cfg.ffn_hidden_size // len(tm.hf), h)] * len(tm.hf)
    if tm.kind == "vocab":
        return [(cfg.vocab_size, h)]
    if tm.mcore.endswith(("q_layernorm.weight", "k_layernorm.weight")):
        return [(hn,)]
    if "layernorm" in tm.mcore:
        return [(h,)]
    if tm.mcore.endswith("linear_proj.weight"):
        return [(h, nq * hn)]
    return [(h, cfg.ffn_hidden_size)]  # linear_fc2


def to_mcore(tm: TensorMap, tensors: Sequence[torch.Tensor], cfg: ModelConfig) -> torch.Tensor:
    if tm.kind == "copy":
        return tensors[0]
    if tm.kind == "fc1":
        return torch.cat(list(tensors), dim=0)  # [f, h] x 2 -> [2f, h]; fused [2f, h] as is
    if tm.kind == "vocab":
        rows = cfg.padded_vocab_size - cfg.vocab_size
        t = tensors[0]
        return torch.cat([t, t.new_zeros(rows, *t.shape[1:])]) if rows else t
    ng, hn = cfg.num_query_groups, cfg.kv_channels
    if len(tensors) == 1:  # fused [q; k; v]: [(np+2ng)*hn, (h)] -> q, k, v
        tensors = torch.split(tensors[0], [cfg.num_attention_heads * hn, ng * hn, ng * hn])
    q, k, v = tensors
    tail = q.shape[1:]
    # [np*hn, (h)] -> [ng, hpg*hn, (h)]; k, v: [ng*hn, (h)] -> [ng, hn, (h)]
    parts = [q.reshape(ng, -1, *tail), k.reshape(ng, hn, *tail), v.reshape(ng, hn, *tail)]
    return torch.cat(parts, dim=1).reshape(-1, *tail)  # [ng*(hpg+2)*hn, (h)]


def to_hf(tm: TensorMap, tensor: torch.Tensor, cfg: ModelConfig) -> List[torch.Tensor]:
    if tm.kind == "copy":
        return [tensor]
    if tm.kind == "fc1":
        return list(torch.chunk(tensor, len(tm.hf), dim=0))  # [2f, h] -> gate, up (or fused)
    if tm.kind == "vocab":
        return [tensor[: cfg.vocab_size]]
    ng, hn, hpg, tail = cfg.num_query_groups, cfg.kv_channels, cfg.heads_per_group, tensor.shape[1:]
    grouped = tensor.reshape(ng, (hpg + 2) * hn, *tail)  # [ng, (hpg+2)*hn, (h)]
    q, k, v = torch.split(grouped, [hpg * hn, hn, hn], dim=1)
    q, k, v = q.reshape(-1, *tail), k.reshape(-1, *tail), v.reshape(-1, *tail)
    return [q, k, v] if len(tm.hf) == 3 else [torch.cat([q, k, v])]  # [(np+2ng)*hn, (h)]


def hf_to_mcore_state_dict(hf_sd: Dict[str, torch.Tensor], cfg: ModelConfig,
                           model_type: str = "llama") -> Dict[str, torch.Tensor]:
    """Full HF tensors -> full megatron tensors (for tests and small models)."""
    return {tm.mcore: to_mcore(tm, [hf_sd[n] for n in tm.hf], cfg)
            for tm in tensor_maps(cfg, model_type)}


def mcore_to_hf_state_dict(mcore_sd: Dict[str, torch.Tensor], cfg: ModelConfig,
                           model_type: Optional[str] = None) -> Dict[str, torch.Tensor]:
    out: Dict[str, torch.Tensor] = {}
    for tm in tensor_maps(cfg, model_type):
        out.update(zip(tm.hf, to_hf(tm, mcore_sd[tm.mcore], cfg)))
    return out


def is_ignored_hf_key(name: str, cfg: ModelConfig) -> bool:
    """HF tensors that carry no information for megatron (a tied lm_head, RoPE buffers)."""
    tied_head = name == "lm_head.weight" and cfg.share_embeddings_and_output_weights
    return tied_head or name.endswith(IGNORED_HF_SUFFIXES)
