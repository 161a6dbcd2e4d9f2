"""ModelConfig: the architecture, in megatron-core's own names."""

from dataclasses import dataclass
from typing import List, Optional

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.moe import check_moe, moe_mlp_parameters

ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu", "squared_relu")
LAYER_TYPES = ("sliding_attention", "full_attention")
NORMALIZATIONS = ("RMSNorm", "LayerNorm")


@dataclass
class RopeScaling:
    """Llama 3.1-style RoPE frequency scaling (HF `rope_scaling` with rope_type "llama3")."""

    factor: float = 8.0
    """Ratio of the new to the original context length."""
    low_freq_factor: float = 1.0
    """Wavelengths longer than original_max_position_embeddings / low_freq_factor are scaled."""
    high_freq_factor: float = 4.0
    """Wavelengths shorter than original_max_position_embeddings / high_freq_factor are kept."""
    original_max_position_embeddings: int = 8192
    """Context length the model was pretrained with."""


@dataclass
class ModelConfig:
    """A GPT-style decoder. Field names are megatron-core's TransformerConfig/GPTModel names."""

    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 128
    """Width of the residual stream (embedding channels)."""
    ffn_hidden_size: int = 384
    """Width of the MLP (per half of the gated unit when gated_linear_unit)."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: Optional[int] = None
    """Number of key/value heads (GQA groups). None means num_attention_heads (plain MHA)."""
    kv_channels: Optional[int] = None
    """Head dimension. None means hidden_size // num_attention_heads; pruned models set it
    explicitly because it stays fixed when hidden_size or heads shrink."""
    vocab_size: int = 256
    """Real vocabulary size (the tokenizer's). The embedding is padded beyond it."""
    make_vocab_size_divisible_by: int = 128
    """Pad the embedding rows to a multiple of this (independent of TP, so checkpoints reshard)."""
    max_position_embeddings: int = 2048
    """Longest sequence the model is built for."""
    normalization: str = "RMSNorm"
    """"RMSNorm" or "LayerNorm"."""
    layernorm_epsilon: float = 1e-5
    """Norm epsilon (HF rms_norm_eps)."""
    gated_linear_unit: bool = True
    """SwiGLU-style gated MLP (Llama, Mistral, Qwen2)."""
    activation: str = "silu"
    """MLP activation: silu, gelu, gelu_tanh (tanh-approximated gelu: Gemma's GeGLU), relu or
    squared_relu."""
    position_embedding_type: str = "rope"
    """"rope" or "learned_absolute"."""
    rotary_base: float = 10000.0
    """RoPE theta."""
    rotary_percent: float = 1.0
    """Fraction of the head dimension that is rotated."""
    rope_scaling: Optional[RopeScaling] = None
    """Llama 3.1 RoPE scaling; None for plain RoPE."""
    share_embeddings_and_output_weights: bool = False
    """Tie the output layer to the input embedding."""
    add_bias_linear: bool = False
    """Biases on every linear layer."""
    add_qkv_bias: bool = False
    """Biases on the QKV projection only (Qwen2)."""
    qk_layernorm: bool = False
    """Normalize each query and key head (`normalization` over kv_channels, one weight shared
    by all heads) before RoPE (Qwen3's q_norm/k_norm)."""
    layernorm_zero_centered_gamma: bool = False
    """Every norm (RMSNorm) scales by (1 + weight), the weight starting at zero (Gemma's);
    megatron-core's name, served by models/gemma.py on the local spec."""
    embedding_scale_sqrt_hidden: bool = False
    """Multiply the embedding output by sqrt(hidden_size), in the embedding's dtype (Gemma)."""
    post_sublayer_norms: bool = False
    """A norm after the attention and one after the MLP, each before its residual add
    (Gemma 2 and 3; needs layernorm_zero_centered_gamma)."""
    softmax_scale: Optional[float] = None
    """Attention scores times this; None: 1/sqrt(kv_channels). Gemma sets it from
    query_pre_attn_scalar ** -0.5."""
    sliding_window: Optional[int] = None
    """Tokens a sliding-window layer attends to, itself included (HF sliding_window); None: no
    layer has a window."""
    layer_types: Optional[List[str]] = None
    """Per layer "sliding_attention" or "full_attention" (HF layer_types); None with a
    sliding_window: every layer slides."""
    rotary_base_local: Optional[float] = None
    """RoPE theta of the sliding-window layers (Gemma 3's rope_local_base_freq); None: those
    layers use rotary_base as the others."""
    attn_logit_softcapping: Optional[float] = None
    """Attention scores become cap * tanh(scores / cap) before the mask (Gemma 2)."""
    final_logit_softcapping: Optional[float] = None
    """Output logits become cap * tanh(logits / cap) (Gemma 2)."""
    init_method_std: float = 0.02
    """Std of the normal initialisation of new weights."""
    hidden_dropout: float = 0.0
    """Dropout after attention and MLP."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    # Mixture of experts (megatron-core MoE; checked in config/moe.py)
    num_moe_experts: Optional[int] = None
    """Routed experts in every layer's MLP; None for a dense model."""
    moe_ffn_hidden_size: Optional[int] = None
    """Width of each routed expert's MLP. None means ffn_hidden_size."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_router_pre_softmax: bool = False
    """True: softmax over all experts, then the top-k probabilities as they are (Qwen-MoE with
    norm_topk_prob=false). False: softmax over the top-k logits, i.e. the top-k of the full
    softmax renormalised to sum to one (Mixtral; Qwen-MoE with norm_topk_prob=true)."""
    moe_shared_expert_intermediate_size: Optional[int] = None
    """Width of the shared expert every token goes through (Qwen2-MoE); None for none."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by sigmoid(hidden @ gate) (Qwen2-MoE)."""
    moe_aux_loss_coeff: float = 0.0
    """Load-balancing (switch) auxiliary loss weight in training; routing is unchanged."""

    def __post_init__(self):
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.kv_channels is None:
            if self.hidden_size % self.num_attention_heads:
                raise ConfigError(
                    "model.kv_channels",
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}",
                    "set model.kv_channels (the head dimension) explicitly",
                )
            self.kv_channels = self.hidden_size // self.num_attention_heads
        for name in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                     "num_query_groups", "kv_channels", "vocab_size", "make_vocab_size_divisible_by"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name}", f"must be positive, got {getattr(self, name)}",
                                  "use a positive integer")
        if self.num_attention_heads % self.num_query_groups:
            raise ConfigError(
                "model.num_query_groups",
                f"num_attention_heads {self.num_attention_heads} is not divisible by "
                f"num_query_groups {self.num_query_groups}",
                "choose a divisor of num_attention_heads",
            )
        if self.normalization not in NORMALIZATIONS:
            raise ConfigError("model.normalization", f"unknown {self.normalization!r}",
                              f"use one of {NORMALIZATIONS}")
        if self.activation not in ACTIVATIONS:
            raise ConfigError("model.activation", f"unknown {self.activation!r}",
                              f"use one of {ACTIVATIONS}")
        if self.position_embedding_type not in ("rope", "learned_absolute"):
            raise ConfigError("model.position_embedding_type",
                              f"unknown {self.position_embedding_type!r}",
                              "use 'rope' or 'learned_absolute'")
        self._check_gemma_parts()
        check_moe(self)

    def _check_gemma_parts(self) -> None:
        if self.layer_types is not None:
            bad = sorted(set(self.layer_types) - set(LAYER_TYPES))
            if len(self.layer_types) != self.num_layers or bad:
                raise ConfigError("model.layer_types", f"needs {self.num_layers} entries of "
                                  f"{LAYER_TYPES}, got {len(self.layer_types)}"
                                  f"{' with ' + str(bad) if bad else ''}",
                                  "give one entry per layer, or null")
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ConfigError("model.sliding_window", f"must be positive, got "
                              f"{self.sliding_window}", "use a positive window or null")
        if (self.post_sublayer_norms or self.layernorm_zero_centered_gamma) and \
                self.normalization != "RMSNorm":
            raise ConfigError("model.normalization", "zero-centred and post-sublayer norms are "
                              "RMSNorms", "set model.normalization=RMSNorm")
        if self.post_sublayer_norms and not self.layernorm_zero_centered_gamma:
            raise ConfigError("model.post_sublayer_norms", "post-sublayer norms are Gemma's "
                              "zero-centred RMSNorms", "set model.layernorm_zero_centered_gamma="
                              "true as well")
        for name in ("attn_logit_softcapping", "final_logit_softcapping", "softmax_scale",
                     "rotary_base_local"):
            v = getattr(self, name)
            if v is not None and not v > 0:
                raise ConfigError(f"model.{name}", f"must be positive, got {v}",
                                  "use a positive number or null")

    @property
    def padded_vocab_size(self) -> int:
        """Embedding rows: vocab_size rounded up to make_vocab_size_divisible_by."""
        d = self.make_vocab_size_divisible_by
        return -(-self.vocab_size // d) * d

    @property
    def heads_per_group(self) -> int:
        return self.num_attention_heads // self.num_query_groups

    def num_parameters(self, include_embeddings: bool = True) -> int:
        """Exact parameter count of the megatron-core model (padded embedding rows included)."""
        h, f, hn = self.hidden_size, self.ffn_hidden_size, self.kv_channels
        nq, ng = self.num_attention_heads, self.num_query_groups
        qkv_out = (nq + 2 * ng) * hn
        attn = h * qkv_out + nq * hn * h
        if self.add_bias_linear or self.add_qkv_bias:
            attn += qkv_out
        if self.add_bias_linear:
            attn += h
        if self.qk_layernorm:
            attn += 2 * hn * (1 if self.normalization == "RMSNorm" else 2)
        fc1_out = 2 * f if self.gated_linear_unit else f
        mlp = h * fc1_out + f * h + ((fc1_out + h) if self.add_bias_linear else 0)
        if self.num_moe_experts is not None:
            mlp = moe_mlp_parameters(self)
        norm = h if self.normalization == "RMSNorm" else 2 * h
        per_layer = attn + mlp + (4 if self.post_sublayer_norms else 2) * norm
        total = self.num_layers * per_layer + norm  # final norm
        if include_embeddings:
            emb = self.padded_vocab_size * h
            total += emb if self.share_embeddings_and_output_weights else 2 * emb
            if self.position_embedding_type == "learned_absolute":
                total += self.max_position_embeddings * h
        return total
