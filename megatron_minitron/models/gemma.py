"""The parts of Gemma 1/2/3 that megatron-core 0.16's local layer spec lacks, supplied as spec
modules and forward hooks on a stock GPTModel (no subclass):

- zero-centred RMSNorm, `x / rms(x) * (1 + w)` computed in fp32 (ZeroCenteredRMSNorm): every
  norm of the model, q/k norms included (`model.layernorm_zero_centered_gamma`);
- the embedding output times sqrt(hidden_size), the factor cast to the embedding's dtype first
  as transformers does (`model.embedding_scale_sqrt_hidden`); the factor is this model's
  hidden_size, so a pruned model scales by its own width, as its exported config.json makes
  transformers compute;
- norms after the attention and after the MLP, before each residual add
  (`model.post_sublayer_norms`): each TransformerLayer holds `post_self_attn_layernorm` and
  `post_mlp_layernorm`, applied by hooks on its self_attention and mlp outputs;
- a second RoPE base for the sliding-window layers (`model.rotary_base_local`): those layers'
  attention receives the rotary angles of a second RotaryEmbedding;
- the attention window of each layer (`model.sliding_window`, `model.layer_types`) and
  attention logit soft-capping (`model.attn_logit_softcapping`), read by
  models/attention.SDPAttention from its own attributes;
- final logit soft-capping (`model.final_logit_softcapping`), a hook on the output layer.
"""

import math
import torch

from megatron_minitron.config.model import ModelConfig

SLIDING = "sliding_attention"
POST_NORMS = ("post_self_attn_layernorm", "post_mlp_layernorm")
"""The per-layer norm modules post_sublayer_norms adds (their `.weight` are [hidden])."""


class ZeroCenteredRMSNorm(torch.nn.Module):
    """RMSNorm with a zero-centred gain, as Gemma's: the weight starts at zero (identity). Same
    constructor as megatron-core's norm modules, so layer specs build it."""

    def __init__(self, config, hidden_size: int, eps: float = 1e-6, **unused):
        super().__init__()
        self.eps = eps
        self.weight = torch.nn.Parameter(torch.zeros(hidden_size, dtype=config.params_dtype))
        setattr(self.weight, "sequence_parallel", config.sequence_parallel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return (h * (1.0 + self.weight.float())).type_as(x)


def needs_own_parts(model: ModelConfig) -> bool:
    """Whether build_model must apply this module's parts."""
    return (model.layernorm_zero_centered_gamma or model.embedding_scale_sqrt_hidden
            or model.post_sublayer_norms or model.rotary_base_local is not None
            or model.sliding_window is not None or model.attn_logit_softcapping is not None
            or model.final_logit_softcapping is not None)


def patch_spec(spec, model: ModelConfig):
    """The local layer spec with zero-centred norms (every norm it builds)."""
    if not model.layernorm_zero_centered_gamma:
        return spec
    sub = spec.submodules
    sub.input_layernorm = ZeroCenteredRMSNorm
    sub.pre_mlp_layernorm = ZeroCenteredRMSNorm
    if model.qk_layernorm:
        sub.self_attention.submodules.q_layernorm = ZeroCenteredRMSNorm
        sub.self_attention.submodules.k_layernorm = ZeroCenteredRMSNorm
    return spec


def is_sliding(model: ModelConfig, layer_number: int) -> bool:
    """Whether the layer (global, 1-based) attends within a sliding window."""
    if model.sliding_window is None:
        return False
    types = model.layer_types
    return types is None or types[layer_number - 1] == SLIDING


def _post_norm_hook(norm: torch.nn.Module):
    def hook(module, args, output):
        out, bias = output
        return norm(out), bias
    return hook


def _local_rope_hook(rope: torch.nn.Module):
    def hook(module, args, kwargs):
        emb = kwargs.get("rotary_pos_emb")
        if isinstance(emb, torch.Tensor):
            kwargs["rotary_pos_emb"] = rope(emb.shape[0]).to(emb.device)
        return args, kwargs
    return hook


def _embedding_scale_hook(scale: float):
    def hook(module, args, output):
        return output * torch.tensor(scale, dtype=output.dtype, device=output.device)
    return hook


def _softcap_hook(cap: float):
    def hook(module, args, output):
        logits, bias = output
        return torch.tanh(logits / cap) * cap, bias
    return hook


def apply(gpt, model: ModelConfig, config) -> None:
    """Give a freshly built GPTModel (one pipeline chunk) the parts `model` asks for."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    if model.layernorm_zero_centered_gamma and getattr(gpt.decoder, "final_layernorm", None) \
            is not None:
        gpt.decoder.final_layernorm = ZeroCenteredRMSNorm(config, model.hidden_size,
                                                          model.layernorm_epsilon)
    if model.embedding_scale_sqrt_hidden and gpt.pre_process:
        gpt.embedding.word_embeddings.register_forward_hook(
            _embedding_scale_hook(math.sqrt(model.hidden_size)))
    if model.final_logit_softcapping is not None and gpt.post_process:
        gpt.output_layer.register_forward_hook(_softcap_hook(model.final_logit_softcapping))
        gpt.final_logit_softcapping = model.final_logit_softcapping  # output_layer.py reads it
    local_rope = None
    if model.rotary_base_local is not None:
        local_rope = RotaryEmbedding(kv_channels=model.kv_channels,
                                     rotary_percent=model.rotary_percent,
                                     rotary_base=model.rotary_base_local,
                                     use_cpu_initialization=config.use_cpu_initialization)
        gpt.rotary_pos_emb_local = local_rope  # a module without state: nothing to save
    for layer in gpt.decoder.layers:
        sliding = is_sliding(model, layer.layer_number)
        core = layer.self_attention.core_attention
        core.sliding_window = model.sliding_window if sliding else None
        core.logit_softcapping = model.attn_logit_softcapping
        if model.post_sublayer_norms:
            for name, sub in zip(POST_NORMS, (layer.self_attention, layer.mlp)):
                norm = ZeroCenteredRMSNorm(config, model.hidden_size, model.layernorm_epsilon)
                layer.add_module(name, norm)
                sub.register_forward_hook(_post_norm_hook(norm))
        if local_rope is not None and sliding:
            layer.self_attention.register_forward_pre_hook(_local_rope_hook(local_rope),
                                                           with_kwargs=True)
