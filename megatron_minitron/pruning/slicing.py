"""Slice a full TP=1 GPTModel state dict to a plan, and prune a checkpoint end to end.

linear_qkv rows are interleaved per query group g: [q_1 .. q_hpg, k, v], each kv_channels
rows, so group g owns rows g*(hpg+2)*hn .. (g+1)*(hpg+2)*hn. linear_fc1 rows of a gated MLP
are [gate; up], each ffn_hidden_size rows. Norms fused into linear_qkv / linear_fc1 by the
Transformer-Engine spec (layer_norm_weight/bias) are sliced like the separate norms.
q/k norms (qk_layernorm) hold one [kv_channels] weight shared by every head and group, and
kv_channels is never pruned, so they are kept whole whichever heads survive.
"""

from pathlib import Path
from typing import Dict, Optional

import torch

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.prune import PruneConfig
from megatron_minitron.models.layers import (FC1, FC2_WEIGHT, FINAL_NORM_KEYS, HEAD_DIM_VECTORS,
                                          HIDDEN_COLUMN_KEYS, HIDDEN_VECTORS, LAYER_KEY,
                                          PROJ_WEIGHT, QKV, layer_key)
from megatron_minitron.pruning.depth import renumber
from megatron_minitron.pruning.experts import is_moe_key, moe_slice
from megatron_minitron.pruning.plan import PrunePlan, make_plan, resolve_target


def qkv_rows(groups: torch.Tensor, heads: torch.Tensor, hpg: int, hn: int) -> torch.Tensor:
    """Rows of linear_qkv to keep: per kept group its kept q heads, then its k and v."""
    rows, block = [], (hpg + 2) * hn
    for g in groups.tolist():
        mine = [h - g * hpg for h in heads.tolist() if g * hpg <= h < (g + 1) * hpg]
        for j in mine + [hpg, hpg + 1]:  # q heads, then k (slot hpg) and v (slot hpg + 1)
            rows.append(torch.arange(g * block + j * hn, g * block + (j + 1) * hn))
    return torch.cat(rows)


def head_columns(heads: torch.Tensor, hn: int) -> torch.Tensor:
    """Input columns of linear_proj for the kept heads. # [nq'] -> [nq' * hn]"""
    return (heads[:, None] * hn + torch.arange(hn)[None, :]).reshape(-1)


def fc1_rows(neurons: torch.Tensor, ffn: int, gated: bool) -> torch.Tensor:
    return torch.cat([neurons, neurons + ffn]) if gated else neurons


def _take(t: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]):
    if rows is not None:
        t = t.index_select(0, rows)
    if cols is not None:
        t = t.index_select(1, cols)
    return t.clone()


def _slice_layer(rest: str, t, i: int, plan: PrunePlan):
    src, hid = plan.source, plan.hidden
    if rest.endswith("_extra_state"):
        return t
    if rest in HIDDEN_VECTORS:
        return _take(t, hid, None)
    if rest in HEAD_DIM_VECTORS:  # [hn], shared by all heads
        return t.clone()
    if rest.startswith(QKV):
        rows = qkv_rows(plan.groups[i], plan.heads[i], src.heads_per_group, src.kv_channels)
        return _take(t, rows, hid if rest.endswith("weight") else None)
    if rest == PROJ_WEIGHT:
        return _take(t, hid, head_columns(plan.heads[i], src.kv_channels))
    if rest.startswith(FC1):
        rows = fc1_rows(plan.ffn[i], src.ffn_hidden_size, src.gated_linear_unit)
        return _take(t, rows, hid if rest.endswith("weight") else None)
    if rest == FC2_WEIGHT:
        return _take(t, hid, plan.ffn[i])
    raise ValueError(f"no slicing rule for layer tensor {rest!r}")


def slice_state_dict(state: Dict[str, torch.Tensor], plan: PrunePlan) -> Dict[str, torch.Tensor]:
    """The pruned model's state dict (keys as GPTModel.state_dict() at TP=1, PP=1)."""
    kept = set(n - 1 for n in plan.layers)
    out = {}
    for key, t in state.items():
        m = LAYER_KEY.match(key)
        if m is not None:
            i, rest = int(m.group(1)), m.group(2)
            if i in kept and is_moe_key(rest):
                how = moe_slice(rest, i, plan, fc1_rows)
                if how is not None:  # None: a removed expert's tensor
                    out[layer_key(i, how[0])] = (
                        _take(t, how[1], how[2]) if torch.is_tensor(t) else t)  # _extra_state
            elif i in kept:
                out[key] = _slice_layer(rest, t, i, plan)
        elif key.endswith("_extra_state"):
            out[key] = t
        elif key in FINAL_NORM_KEYS:
            out[key] = _take(t, plan.hidden, None)
        elif key in HIDDEN_COLUMN_KEYS:
            out[key] = _take(t, None, plan.hidden)  # [rows, h] -> [rows, h']
        else:
            raise ValueError(f"no slicing rule for tensor {key!r}")
    return renumber(out, plan.layers)


def prune_checkpoint(checkpoint: str, scores_path: Optional[str], cfg: PruneConfig, output: str,
                     ctx, runtime) -> Path:
    """Load `checkpoint` at TP=1/PP=1, slice it to the target, save under `output`.
    Validation (target, scores hash) happens before any weight is read."""
    import dataclasses

    from megatron_minitron.checkpoint.dist import (CheckpointHeader, carried_extra, load,
                                                   read_header, save)
    from megatron_minitron.config.parallel import ParallelConfig
    from megatron_minitron.importance.scores import load_scores
    from megatron_minitron.models.builder import build_model, unwrap

    if ctx.tp_size != 1 or ctx.pp_size != 1:
        raise ConfigError("parallel.tensor_model_parallel_size", f"pruning runs at TP=1, PP=1, "
                          f"got TP={ctx.tp_size}, PP={ctx.pp_size}",
                          "launch prune with the default parallel layout (any checkpoint loads)")
    header = read_header(checkpoint)
    src = header.model
    scores = load_scores(scores_path) if scores_path else None
    if scores is not None:
        scores.check_model(src)
    target = resolve_target(src, cfg)
    plan = make_plan(src, target, scores, cfg)
    target = plan.target  # with the kept layers' kinds (layer_types)
    chunks = build_model(src, ParallelConfig(), runtime, ctx.device)
    load(checkpoint, chunks, ctx=ctx)
    state = slice_state_dict(unwrap(chunks[0]).state_dict(), plan)
    del chunks
    pruned = build_model(target, ParallelConfig(), runtime, ctx.device)
    unwrap(pruned[0]).load_state_dict(state, strict=True)
    summary = {"source": dataclasses.asdict(src), "layers": plan.layers,
               "scores": None if scores is None else scores.header.model_config_hash}
    extra = {"pruned_from": summary, **carried_extra(header)}
    return save(output, cfg.step, pruned, CheckpointHeader(
        model=target, tokenizer=header.tokenizer, extra=extra), ctx=ctx)
