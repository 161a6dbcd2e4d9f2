"""Gemma 1 (`gemma`), Gemma 2 (`gemma2`) and Gemma 3 text (`gemma3_text`) in Hugging Face
names, for hf_keymap (the only importer of this module): config.json <-> ModelConfig fields
and the per-layer norm tensors. The modules behind the fields are models/gemma.py's.

Norm names: Gemma 1 is Llama-shaped (`post_attention_layernorm` is the norm before the MLP).
Gemma 2 and 3 normalise after each sublayer too: HF `post_attention_layernorm` is the norm
after attention, `pre_feedforward_layernorm` the one before the MLP and
`post_feedforward_layernorm` the one after it.
"""

from typing import Any, Dict, List, Optional, Tuple

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig

ARCHITECTURES = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM",
                 "gemma3_text": "Gemma3ForCausalLM"}
ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}
HF_ACTIVATION = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}
SLIDING, FULL = "sliding_attention", "full_attention"
MULTIMODAL = ("gemma3",)
"""Gemma 3 with a vision tower (Gemma3ForConditionalGeneration): its text model is
`gemma3_text`."""


def _pattern_types(n: int, every: int) -> List[str]:
    """transformers' default layer_types: every `every`-th layer (1-based) global."""
    return [SLIDING if (i + 1) % every else FULL for i in range(n)]


def _rope_theta(hf: Dict[str, Any], kind: str, default: float, legacy: str,
                source: str) -> float:
    """A Gemma 3 RoPE base from transformers 5.x `rope_parameters[kind]` or the 4.x field."""
    params = (hf.get("rope_parameters") or {}).get(kind) or {}
    rope_type = params.get("rope_type", "default")
    scaling = hf.get("rope_scaling") if kind == FULL else None
    if rope_type != "default" or scaling:
        raise ConfigError(f"{source}:rope_parameters", f"{kind} RoPE of type "
                          f"{scaling or rope_type!r} is not supported (the 4B and larger Gemma "
                          "3 models scale it linearly)", "convert a model with default RoPE")
    return float(params.get("rope_theta", hf.get(legacy, default)))


def model_fields(hf: Dict[str, Any], model_type: str, source: str) -> Dict[str, Any]:
    """The ModelConfig fields a Gemma config.json sets beyond the Llama-shaped ones."""
    if model_type in MULTIMODAL:
        raise ConfigError(f"{source}:model_type", "'gemma3' is the multimodal Gemma 3 (a "
                          "vision tower beside the language model)", "convert its text model: "
                          "a Gemma3ForCausalLM checkpoint, model_type gemma3_text")
    act_key = "hidden_act" if model_type == "gemma" else "hidden_activation"
    act = hf.get(act_key) or hf.get("hidden_act") or "gelu_pytorch_tanh"
    if act not in ACTIVATIONS:
        raise ConfigError(f"{source}:{act_key}", f"{act!r} is not supported",
                          f"use one of {sorted(ACTIVATIONS)}")
    if hf.get("attention_bias"):
        raise ConfigError(f"{source}:attention_bias", "Gemma attention biases are not "
                          "supported", "convert a model with attention_bias=false")
    if hf.get("use_bidirectional_attention"):
        raise ConfigError(f"{source}:use_bidirectional_attention", "bidirectional attention "
                          "(an encoder) is not a causal LM", "convert a causal Gemma model")
    n, head_dim = int(hf["num_hidden_layers"]), hf.get("head_dim") or (
        hf["hidden_size"] // hf["num_attention_heads"])
    fields: Dict[str, Any] = dict(
        activation=ACTIVATIONS[act], layernorm_zero_centered_gamma=True,
        embedding_scale_sqrt_hidden=True, share_embeddings_and_output_weights=bool(
            hf.get("tie_word_embeddings", True)))
    if model_type == "gemma":  # scores scaled by 1/sqrt(head_dim), megatron's default
        return fields
    fields["softmax_scale"] = float(hf.get("query_pre_attn_scalar", head_dim)) ** -0.5
    types = list(hf.get("layer_types") or _pattern_types(
        n, int(hf.get("sliding_window_pattern", 2 if model_type == "gemma2" else 6))))
    bad = sorted({t for t in types} - {SLIDING, FULL})
    if len(types) != n or bad:
        raise ConfigError(f"{source}:layer_types", f"needs {n} entries of {SLIDING!r} or "
                          f"{FULL!r}, got {len(types)}{' with ' + str(bad) if bad else ''}",
                          "fix config.json")
    window = hf.get("sliding_window")
    fields.update(post_sublayer_norms=True, layer_types=types,
                  sliding_window=int(window) if window and SLIDING in types else None)
    if model_type == "gemma2":
        fields.update(attn_logit_softcapping=hf.get("attn_logit_softcapping"),
                      final_logit_softcapping=hf.get("final_logit_softcapping"))
    else:
        for key in ("attn_logit_softcapping", "final_logit_softcapping"):
            if hf.get(key) is not None:
                raise ConfigError(f"{source}:{key}", "Gemma 3 has no soft-capping",
                                  "set it to null")
        fields.update(qk_layernorm=True,
                      rotary_base=_rope_theta(hf, FULL, 1_000_000.0, "rope_theta", source),
                      rotary_base_local=_rope_theta(hf, SLIDING, 10_000.0,
                                                    "rope_local_base_freq", source))
    return fields


def default_model_type(cfg: ModelConfig) -> Optional[str]:
    """The Gemma generation whose parts `cfg` has; None for a model that is not Gemma's."""
    if not cfg.layernorm_zero_centered_gamma:
        return None
    if cfg.qk_layernorm or cfg.rotary_base_local is not None:
        return "gemma3_text"
    return "gemma2" if cfg.post_sublayer_norms else "gemma"


def export_problem(cfg: ModelConfig, model_type: str) -> Optional[str]:
    """Why `cfg` cannot be written as HF `model_type` (a Gemma generation or not)."""
    gemma = model_type in ARCHITECTURES
    own = default_model_type(cfg)
    if not gemma:
        return None if own is None else (
            f"zero-centred norms and the other Gemma parts need a Gemma model_type ({own})")
    checks = [
        (not cfg.layernorm_zero_centered_gamma, "Gemma uses zero-centred (1+w) RMSNorm"),
        (not cfg.embedding_scale_sqrt_hidden, "Gemma scales the embedding by sqrt(hidden)"),
        (cfg.activation not in HF_ACTIVATION, f"activation {cfg.activation!r}"),
        (cfg.add_qkv_bias or cfg.add_bias_linear, "Gemma has no linear biases"),
        (cfg.rope_scaling is not None, "rope_scaling (Llama 3.1's) is not Gemma's"),
        (model_type == "gemma" and (cfg.post_sublayer_norms or cfg.sliding_window is not None
                                    or cfg.softmax_scale is not None),
         "Gemma 1 has no post-sublayer norms, sliding windows or query_pre_attn_scalar"),
        (model_type != "gemma" and not cfg.post_sublayer_norms,
         f"{model_type} has post-attention and post-feedforward norms"),
        (model_type == "gemma3_text" and not cfg.qk_layernorm, "Gemma 3 has q/k norms"),
        (model_type != "gemma3_text" and (cfg.qk_layernorm or cfg.rotary_base_local is not None),
         "q/k norms and a local RoPE base are Gemma 3's (model_type gemma3_text)"),
        (model_type != "gemma" and cfg.hidden_size % cfg.num_attention_heads != 0,
         f"transformers' {ARCHITECTURES[model_type]} config rejects hidden_size "
         f"{cfg.hidden_size} not divisible by num_attention_heads {cfg.num_attention_heads}; "
         "prune heads or hidden to a divisor"),
        (model_type == "gemma3_text" and (cfg.attn_logit_softcapping is not None
                                          or cfg.final_logit_softcapping is not None),
         "soft-capping is Gemma 2's"),
    ]
    return next((why for bad, why in checks if bad), None)


def _query_pre_attn_scalar(cfg: ModelConfig) -> float:
    """HF's query_pre_attn_scalar for softmax_scale = scalar ** -0.5 (an integer in every
    released Gemma, written as one when it rounds to one)."""
    scale = cfg.softmax_scale if cfg.softmax_scale is not None else cfg.kv_channels ** -0.5
    scalar = scale ** -2
    return int(round(scalar)) if abs(scalar - round(scalar)) < 1e-6 * scalar else scalar


def hf_fields(cfg: ModelConfig, model_type: str) -> Dict[str, Any]:
    """config.json fields of a Gemma generation, beyond the Llama-shaped ones."""
    act = HF_ACTIVATION[cfg.activation]
    hf: Dict[str, Any] = {"hidden_act": act, "hidden_activation": act, "attention_bias": False}
    if model_type == "gemma":
        return hf
    hf["query_pre_attn_scalar"] = _query_pre_attn_scalar(cfg)
    windowed = cfg.sliding_window is not None and cfg.layer_types is not None
    hf.update(layer_types=list(cfg.layer_types) if windowed else [FULL] * cfg.num_layers,
              sliding_window=cfg.sliding_window)
    if model_type == "gemma2":
        hf.update(attn_logit_softcapping=cfg.attn_logit_softcapping,
                  final_logit_softcapping=cfg.final_logit_softcapping)
        return hf
    local = cfg.rotary_base_local if cfg.rotary_base_local is not None else cfg.rotary_base
    hf.update(attn_logit_softcapping=None, final_logit_softcapping=None,
              rope_theta=cfg.rotary_base, rope_local_base_freq=local, rope_scaling=None,
              rope_parameters={FULL: {"rope_type": "default", "rope_theta": cfg.rotary_base},
                               SLIDING: {"rope_type": "default", "rope_theta": local}})
    return hf


def layer_norm_maps(model_type: str, m: str, h: str) -> List[Tuple[str, str]]:
    """(megatron, HF) names of one layer's norms beside input_layernorm."""
    if model_type == "gemma":
        return [(m + "pre_mlp_layernorm.weight", h + "post_attention_layernorm.weight")]
    return [(m + "post_self_attn_layernorm.weight", h + "post_attention_layernorm.weight"),
            (m + "pre_mlp_layernorm.weight", h + "pre_feedforward_layernorm.weight"),
            (m + "post_mlp_layernorm.weight", h + "post_feedforward_layernorm.weight")]
