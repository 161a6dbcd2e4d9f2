"""Divergence guard: a step with a NaN/inf loss or gradient norm changes nothing, a run of them
stops the stage, and a checkpoint is never written with non-finite weights or Adam moments."""

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

from megatron_minitron.config.errors import ConfigError


class NonFiniteError(ConfigError):
    """The run diverged: too many consecutive non-finite steps, or non-finite state to save."""


def guarded_step(optimizer, loss_finite: bool) -> "tuple[bool, float]":
    """megatron's optimizer.step() split at the point where a bad step must stop: (updated,
    grad_norm). megatron's found-inf path (fp16 loss scaling) runs first; the global grad norm
    (all-reduced over model-parallel ranks, so every rank decides alike) then gates clipping and
    the update. Clipping reuses that norm, as megatron's ChainedOptimizer.step does."""
    from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32

    if optimizer.prepare_grads():
        return False, math.nan
    grad_norm = float(optimizer.get_grad_norm())
    if not (loss_finite and math.isfinite(grad_norm)):
        return False, grad_norm
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        params = o.get_parameters()
        if o.config.clip_grad > 0.0 and params:
            clip_grad_by_total_norm_fp32(params, max_norm=o.config.clip_grad,
                                         total_norm=grad_norm,
                                         use_decoupled_grad=o.config
                                         .use_precision_aware_optimizer_no_fp8_or_ds_fp8)
    return bool(optimizer.step_with_ready_grads()), grad_norm


@dataclass
class NonFiniteGuard:
    """Counts skipped steps; raises once `limit` happen in a row."""

    limit: int
    lr: float
    consecutive: int = 0
    total: int = 0
    first_bad_step: Optional[int] = None
    last_step: int = 0
    bad: Dict[str, float] = field(default_factory=dict)

    def update(self, step: int, skipped: bool, values: Dict[str, float]) -> None:
        if not skipped:
            self.consecutive, self.first_bad_step = 0, None
            return
        self.total += 1
        self.consecutive += 1
        if self.first_bad_step is None:
            self.first_bad_step = step
        self.bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        self.last_step = step

    def check(self) -> None:
        """Raise once the limit of consecutive skipped steps is reached (after logging them)."""
        if self.consecutive < self.limit:
            return
        bad = ", ".join(f"{k}={v}" for k, v in self.bad.items()) or "fp16 overflow"
        raise NonFiniteError(
            "train.max_nonfinite_steps",
            f"{self.consecutive} consecutive steps ({self.first_bad_step}-{self.last_step}) "
            f"had a non-finite loss or gradient norm ({bad}); they were skipped and nothing "
            "was saved from them",
            f"the run diverged: lower train.optimizer.lr (now {self.lr:g}) or set "
            "train.optimizer.clip_grad > 0, then rerun (it resumes from the last checkpoint); "
            "raise train.max_nonfinite_steps only to ride out rare spikes")


def _state_tensors(chunks: List[torch.nn.Module], optimizer) -> "list[tuple[str, torch.Tensor]]":
    out = [(n, p) for c in chunks for n, p in c.named_parameters()]
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        inner = getattr(o, "optimizer", None)
        if inner is None:
            continue
        for g in inner.param_groups:
            out += [("optimizer main param", p) for p in g["params"]]
        for st in inner.state.values():
            out += [(f"optimizer {k}", v) for k, v in st.items()
                    if torch.is_tensor(v) and v.is_floating_point()]
    return out


def first_nonfinite(chunks: List[torch.nn.Module], optimizer, device: torch.device
                    ) -> Optional[str]:
    """The name of a NaN/inf tensor among weights and optimizer state, agreed by all ranks
    (collective) so that all of them skip the save together; None when everything is finite."""
    bad = next((n for n, t in _state_tensors(chunks, optimizer)
                if not torch.isfinite(t.detach()).all()), None)
    if dist.is_initialized() and dist.get_world_size() > 1:
        flag = torch.tensor([0.0 if bad is None else 1.0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item() and bad is None:
            bad = "a tensor on another rank"
    return bad
