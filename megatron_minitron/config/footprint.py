"""What a ModelConfig costs at inference beyond its parameter count: the parameters one token
uses (mixture of experts: its top-k experts only) and the memory of weights plus KV cache."""

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8": 1}


def kv_cache_bytes(cfg, dtype_bytes: int, context_length: int, batch_size: int) -> int:
    """Keys and values of every layer for batch_size sequences of context_length tokens:
    2 x num_layers x num_query_groups x kv_channels per token."""
    per_token = 2 * cfg.num_layers * cfg.num_query_groups * cfg.kv_channels
    return per_token * context_length * batch_size * dtype_bytes


def inference_memory_bytes(cfg, dtype: str, context_length: int, batch_size: int) -> int:
    """Every weight (padded embedding rows included) and the KV cache, both at `dtype`."""
    b = DTYPE_BYTES[dtype]
    return cfg.num_parameters(include_embeddings=True) * b + kv_cache_bytes(
        cfg, b, context_length, batch_size)
