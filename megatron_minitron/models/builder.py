"""ModelConfig -> megatron-core TransformerConfig -> GPTModel chunks for this rank."""

from functools import partial
from typing import List

import torch
import torch.nn.functional as F

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
from megatron_minitron.models import gemma
from megatron_minitron.models.moe import moe_layer_spec, moe_transformer_kwargs
from megatron_minitron.runtime.device import (resolve_attention_impl, resolve_precision,
                                              resolve_transformer_impl)


def _squared_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.pow(F.relu(x), 2)


ACTIVATION_FUNCS = {"silu": F.silu, "gelu": F.gelu,
                    "gelu_tanh": partial(F.gelu, approximate="tanh"), "relu": F.relu,
                    "squared_relu": _squared_relu}


def transformer_config(model: ModelConfig, parallel: ParallelConfig, runtime: RuntimeConfig,
                       device_type: str = "cpu"):
    """The megatron-core TransformerConfig for our ModelConfig under a parallel layout."""
    from megatron.core.transformer.transformer_config import TransformerConfig

    # megatron-core's own mixed precision on CPU and GPU alike: bf16 params and activations,
    # fp32 main params and grads in the optimizer. (torch.autocast does not reach megatron's
    # custom autograd linears on CPU: their custom_fwd is bound to device_type="cuda".)
    mcore_bf16 = resolve_precision(runtime, device_type) == "bf16"
    return TransformerConfig(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.kv_channels,
        normalization=model.normalization,
        layernorm_epsilon=model.layernorm_epsilon,
        gated_linear_unit=model.gated_linear_unit,
        activation_func=ACTIVATION_FUNCS[model.activation],
        add_bias_linear=model.add_bias_linear,
        add_qkv_bias=model.add_qkv_bias,
        qk_layernorm=model.qk_layernorm,
        softmax_scale=model.softmax_scale,
        hidden_dropout=model.hidden_dropout,
        attention_dropout=model.attention_dropout,
        init_method_std=model.init_method_std,
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        sequence_parallel=parallel.sequence_parallel,
        bf16=mcore_bf16,
        params_dtype=torch.bfloat16 if mcore_bf16 else torch.float32,
        pipeline_dtype=torch.bfloat16 if mcore_bf16 else torch.float32,
        use_cpu_initialization=device_type != "cuda",
        bias_activation_fusion=_own_swiglu(model, runtime),
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=_own_rope(model, runtime),
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        attention_softmax_in_fp32=True,
        deallocate_pipeline_outputs=device_type == "cuda",
        **moe_transformer_kwargs(model, parallel),
    )


def _own_rope(model: ModelConfig, runtime: RuntimeConfig) -> bool:
    """models/rope.py's RoPE as megatron's fused one: the local layer spec with our attention
    kernels (runtime.attention_impl sdpa), rotary positions, and no Transformer-Engine RoPE
    already registered (then megatron's unfused path stays, as before)."""
    if (model.position_embedding_type != "rope" or resolve_attention_impl(runtime) != "sdpa"
            or resolve_transformer_impl(runtime) != "local"):
        return False
    from megatron_minitron.models.rope import install

    return install()


def _own_swiglu(model: ModelConfig, runtime: RuntimeConfig) -> bool:
    """models/swiglu.py's SwiGLU as megatron's fused one (bias_activation_fusion on), under the
    same conditions as our RoPE: the local spec with runtime.attention_impl sdpa; for a
    bias-free SwiGLU MLP only (other activations keep megatron's unfused path)."""
    if (model.activation != "silu" or not model.gated_linear_unit or model.add_bias_linear
            or resolve_attention_impl(runtime) != "sdpa"
            or resolve_transformer_impl(runtime) != "local"):
        return False
    from megatron_minitron.models.swiglu import install

    return install()


def layer_spec(model: ModelConfig, runtime: RuntimeConfig):
    from megatron.core.models.gpt import gpt_layer_specs as specs

    own = gemma.needs_own_parts(model)
    if own and resolve_transformer_impl(runtime) == "transformer_engine":
        raise ConfigError("runtime.transformer_impl", "Gemma's parts (zero-centred norms, "
                          "post-sublayer norms, windows, soft-capping) are built on the local "
                          "layer spec (models/gemma.py)", "set runtime.transformer_impl=local")
    if own and (model.sliding_window is not None or model.attn_logit_softcapping is not None) \
            and resolve_attention_impl(runtime) != "sdpa":
        raise ConfigError("runtime.attention_impl", "sliding windows and attention soft-capping "
                          "of this model are computed by models/attention.py's SDPAttention",
                          "set runtime.attention_impl=auto or sdpa")
    if resolve_transformer_impl(runtime) == "transformer_engine":
        if model.num_moe_experts is not None:
            raise ConfigError("runtime.transformer_impl", "MoE models run on the local "
                              "layer spec only (SequentialMLP experts)",
                              "set runtime.transformer_impl=local")
        return specs.get_gpt_layer_with_transformer_engine_spec(qk_layernorm=model.qk_layernorm)
    spec = (moe_layer_spec(model) if model.num_moe_experts is not None
            else specs.get_gpt_layer_local_spec(normalization=model.normalization,
                                                qk_layernorm=model.qk_layernorm))
    if resolve_attention_impl(runtime) == "sdpa":
        from megatron_minitron.models.attention import SDPAttention

        spec.submodules.self_attention.submodules.core_attention = SDPAttention
    return gemma.patch_spec(spec, model)


def build_model(model: ModelConfig, parallel: ParallelConfig, runtime: RuntimeConfig,
                device: torch.device) -> List[torch.nn.Module]:
    """The GPTModel chunks this rank owns (one per virtual pipeline stage); in bf16 each is
    wrapped in megatron's Float16Module (unwrap() reaches the GPTModel)."""
    from megatron.core.models.gpt import GPTModel

    from megatron_minitron.runtime.distributed import pipeline_stage_flags, set_virtual_pipeline_rank

    config = transformer_config(model, parallel, runtime, device.type)
    spec = layer_spec(model, runtime)
    vpp = parallel.virtual_pipeline_model_parallel_size
    chunks = []
    for vp_stage in range(vpp or 1):
        stage = vp_stage if vpp else None
        if vpp:  # some megatron-core paths still read the global virtual rank
            set_virtual_pipeline_rank(vp_stage)
        pre_process, post_process = pipeline_stage_flags(stage)
        gpt = GPTModel(
            config=config,
            transformer_layer_spec=spec,
            vocab_size=model.padded_vocab_size,
            max_sequence_length=model.max_position_embeddings,
            pre_process=pre_process,
            post_process=post_process,
            parallel_output=True,
            share_embeddings_and_output_weights=model.share_embeddings_and_output_weights,
            position_embedding_type=model.position_embedding_type,
            rotary_percent=model.rotary_percent,
            rotary_base=int(model.rotary_base),
            vp_stage=stage,
        )
        if model.rope_scaling is not None and model.position_embedding_type == "rope":
            _apply_llama3_rope_scaling(gpt, model)
        if gemma.needs_own_parts(model):
            gemma.apply(gpt, model, config)
        gpt = gpt.to(device)
        if config.bf16:
            from megatron.core.transformer.module import Float16Module

            gpt = Float16Module(config, gpt)
        chunks.append(gpt)
    if vpp:
        set_virtual_pipeline_rank(0)
    return chunks


def _apply_llama3_rope_scaling(gpt, model: ModelConfig) -> None:
    """megatron-core hard-codes three of Llama 3.1's four scaling numbers; we pass all four."""
    rope = gpt.rotary_pos_emb
    dim = rope.inv_freq.numel() * 2
    base = 1.0 / (model.rotary_base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    s = model.rope_scaling
    rope.inv_freq = rope._apply_scaling(
        base.to(rope.inv_freq.device), factor=s.factor, low_freq_factor=s.low_freq_factor,
        high_freq_factor=s.high_freq_factor,
        original_max_position_embeddings=s.original_max_position_embeddings)


def unwrap(module: torch.nn.Module) -> torch.nn.Module:
    """The GPTModel inside DDP / Float16Module wrappers."""
    while hasattr(module, "module"):
        module = module.module
    return module
