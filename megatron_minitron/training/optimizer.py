"""Megatron-core DDP, optimizer and LR schedule for a list of model chunks."""

from typing import List, Tuple

import torch

from megatron_minitron.config.train import OptimizerConfig, TrainConfig
from megatron_minitron.training.clip_grads import use_foreach_clipping
from megatron_minitron.training.wgrad import fuse_wgrad_accumulation


def wrap_ddp(chunks: List[torch.nn.Module]) -> List[torch.nn.Module]:
    """megatron-core DistributedDataParallel (fp32 grad buffers, one bucket per chunk), its
    linear layers' weight gradients accumulated in place (training/wgrad.py)."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    ddp_config = DistributedDataParallelConfig(grad_reduce_in_fp32=True, overlap_grad_reduce=False,
                                               use_distributed_optimizer=False)
    wrapped = [DistributedDataParallel(config=c.config, ddp_config=ddp_config, module=c,
                                       disable_bucketing=i > 0) for i, c in enumerate(chunks)]
    fuse_wgrad_accumulation(wrapped)
    return wrapped


def build_optimizer(chunks: List[torch.nn.Module], cfg: OptimizerConfig, train: TrainConfig):
    """(optimizer, scheduler). Chunks must be DDP-wrapped (wrap_ddp). Without TE or apex:
    torch's fused AdamW and foreach gradient clipping (training/clip_grads.py)."""
    from megatron.core.optimizer import OptimizerConfig as McoreOptimizerConfig
    from megatron.core.optimizer import get_megatron_optimizer
    from megatron.core.optimizer_param_scheduler import OptimizerParamScheduler

    tcfg = chunks[0].config
    mcfg = McoreOptimizerConfig(
        optimizer="adam", lr=cfg.lr, min_lr=cfg.min_lr, weight_decay=cfg.weight_decay,
        adam_beta1=cfg.adam_beta1, adam_beta2=cfg.adam_beta2, adam_eps=cfg.adam_eps,
        clip_grad=cfg.clip_grad, bf16=tcfg.bf16, params_dtype=tcfg.params_dtype,
        use_distributed_optimizer=False)
    optimizer = get_megatron_optimizer(mcfg, chunks)
    use_fused_adamw(optimizer)
    use_foreach_clipping()
    samples = train.train_iters * train.global_batch_size
    style, wsd = cfg.lr_decay_style, {}
    if style == "wsd" and train.time_budget_s:
        style = "constant"  # training/time_budget.py decays by the share of time spent
    elif style == "wsd":  # megatron's WSD over the steps' last fraction
        style = "WSD"
        wsd = dict(wsd_decay_steps=max(1, round(cfg.lr_wsd_decay_fraction * samples)),
                   lr_wsd_decay_style="linear")
    scheduler = OptimizerParamScheduler(
        optimizer, init_lr=0.0, max_lr=cfg.lr, min_lr=cfg.min_lr,
        lr_warmup_steps=cfg.lr_warmup_iters * train.global_batch_size,
        lr_decay_steps=max(samples, 1), lr_decay_style=style,
        start_wd=cfg.weight_decay, end_wd=cfg.weight_decay, wd_incr_steps=max(samples, 1),
        wd_incr_style="constant", **wsd)
    return optimizer, scheduler


def use_fused_adamw(optimizer) -> int:
    """Switch megatron's torch AdamW (its fallback without Transformer Engine or apex) to torch's
    fused kernel, one vectorised pass over each parameter, where the parameters' device has it
    (CPU and CUDA); by default torch runs it as a loop of a dozen element-wise ops per parameter
    on CPU. The update is the same up to rounding. Called again after a checkpoint's optimizer
    state loads (its param_groups replace ours). Returns how many groups were switched."""
    switched = 0
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(opt, "optimizer", None)
        if type(inner) is not torch.optim.AdamW:
            continue  # TE's / apex's FusedAdam, or SGD: fused already, or not ours to change
        for group in inner.param_groups:
            params = group["params"]
            if params and all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                              for p in params):
                group["fused"], group["foreach"] = True, False
                switched += 1
    return switched


def attach_schedule_hooks(chunks: List[torch.nn.Module], optimizer) -> None:
    """What megatron's pipeline schedules read from the model config to finish a step."""
    from megatron.core.distributed import finalize_model_grads

    config = chunks[0].config
    config.grad_scale_func = optimizer.scale_loss
    no_sync = [c.no_sync for c in chunks]
    config.no_sync_func = no_sync[0] if len(no_sync) == 1 else no_sync
    config.finalize_model_grads_func = finalize_model_grads


def trainable_parameters(chunks: List[torch.nn.Module]) -> Tuple[int, int]:
    n = sum(p.numel() for c in chunks for p in c.parameters())
    t = sum(p.numel() for c in chunks for p in c.parameters() if p.requires_grad)
    return n, t
