"""Search ceilings beside the parameter budget: active parameters per token and inference
memory (weights + KV cache). A candidate inside the parameter band must also fit under each
ceiling that search.* sets."""

import dataclasses
from typing import Dict, Optional

from megatron_minitron.config.footprint import inference_memory_bytes
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.moe import num_active_parameters
from megatron_minitron.config.search import SearchConfig

GIB = 2 ** 30


def limit_problem(src: ModelConfig, sizes: Dict[str, int], search: SearchConfig,
                  include_embeddings: bool) -> Optional[str]:
    """Why the candidate `sizes` of `src` exceeds a ceiling (None: it fits every one)."""
    if search.active_param_budget is None and search.memory_budget_gib is None:
        return None
    model = dataclasses.replace(src, kv_channels=src.kv_channels, **sizes)
    active = num_active_parameters(model, include_embeddings)
    if search.active_param_budget is not None and active > search.active_param_budget:
        return f"{active} active parameters > search.active_param_budget"
    if search.memory_budget_gib is not None:
        mem = inference_memory_bytes(model, search.memory_dtype, search.memory_context_length,
                                     search.memory_batch_size) / GIB
        if mem > search.memory_budget_gib:
            return f"{mem:.3f} GiB > search.memory_budget_gib"
    return None
