"""Mixture-of-experts fields of ModelConfig: their checks and parameter counts (kept apart so
that the dense config stays short)."""

from megatron_minitron.config.errors import ConfigError


def check_moe(cfg) -> None:
    """Validate (and fill the derived defaults of) the moe_* fields of a ModelConfig."""
    if cfg.num_moe_experts is None:
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            if getattr(cfg, name) is not None:
                raise ConfigError(f"model.{name}", "is set but model.num_moe_experts is null",
                                  "set model.num_moe_experts or leave this field null")
        if cfg.moe_shared_expert_gate:
            raise ConfigError("model.moe_shared_expert_gate", "needs a shared expert",
                              "set model.moe_shared_expert_intermediate_size or the gate false")
        return
    if cfg.moe_ffn_hidden_size is None:
        cfg.moe_ffn_hidden_size = cfg.ffn_hidden_size
    for name in ("num_moe_experts", "moe_ffn_hidden_size", "moe_router_topk"):
        if getattr(cfg, name) < 1:
            raise ConfigError(f"model.{name}", f"must be positive, got {getattr(cfg, name)}",
                              "use a positive integer")
    if cfg.moe_router_topk > cfg.num_moe_experts:
        raise ConfigError("model.moe_router_topk", f"{cfg.moe_router_topk} exceeds "
                          f"num_moe_experts {cfg.num_moe_experts}",
                          "route to at most num_moe_experts experts")
    shared = cfg.moe_shared_expert_intermediate_size
    if shared is not None and shared < 1:
        raise ConfigError("model.moe_shared_expert_intermediate_size", f"must be positive, got "
                          f"{shared}", "use a positive width or null for no shared expert")
    if cfg.moe_shared_expert_gate and shared is None:
        raise ConfigError("model.moe_shared_expert_gate", "needs a shared expert",
                          "set model.moe_shared_expert_intermediate_size or the gate false")
    if cfg.add_bias_linear:
        raise ConfigError("model.add_bias_linear", "megatron-core MoE layers have no linear "
                          "biases", "set model.add_bias_linear=false")
    if cfg.moe_aux_loss_coeff < 0:
        raise ConfigError("model.moe_aux_loss_coeff", "must be >= 0", "use 0 to disable it")


def _gated_mlp(cfg, h: int, f: int) -> int:
    return h * f * (3 if cfg.gated_linear_unit else 2)


def moe_mlp_parameters(cfg, active: bool = False) -> int:
    """Parameters of one MoE layer's MLP (router, experts, shared expert and its gate); with
    `active`, only those one token uses (its moe_router_topk experts)."""
    h = cfg.hidden_size
    experts = cfg.moe_router_topk if active else cfg.num_moe_experts
    n = cfg.num_moe_experts * h + experts * _gated_mlp(cfg, h, cfg.moe_ffn_hidden_size)
    if cfg.moe_shared_expert_intermediate_size is not None:
        n += _gated_mlp(cfg, h, cfg.moe_shared_expert_intermediate_size)
        n += h if cfg.moe_shared_expert_gate else 0
    return n


def num_active_parameters(cfg, include_embeddings: bool = True) -> int:
    """Parameters one token uses: ModelConfig.num_parameters with each MoE layer's routed
    experts counted moe_router_topk times instead of num_moe_experts times."""
    total = cfg.num_parameters(include_embeddings)
    if cfg.num_moe_experts is None:
        return total
    unused = moe_mlp_parameters(cfg) - moe_mlp_parameters(cfg, active=True)
    return total - cfg.num_layers * unused
