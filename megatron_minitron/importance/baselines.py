"""Baseline scores to compare activation importance against: weight magnitude and random.

Both give the scores file's width tensors (and random also its depth tensors) in the same
global order, so `minitron prune` uses them unchanged; the header's `source` says which.

Magnitude: a unit's score is (size of what feeds it) x (size of what it writes), so silencing
either side scores 0, as an inert unit does under activation importance:
  neuron j       ||linear_fc1 rows of j (gate and up)|| x ||linear_fc2 column j||;
  head h         ||value rows of h's query group|| x ||linear_proj columns of h||: attention
                 mixes value vectors with weights summing to 1, so the queries and keys set
                 the pattern but not the size of the head's output;
  query group    the sum of its heads' scores (as for activations);
  channel c      ||everything that writes c|| x ||everything that reads c||: writes are the
                 embedding column and every linear_proj / linear_fc2 row c; reads are the
                 linear_qkv / linear_fc1 / output-layer columns c, each scaled by the gain of
                 the norm in front of it (fused layer_norm_weight under Transformer-Engine).
No depth scores: weights alone say nothing about how much a layer changes the residual
stream, so depth pruning with magnitude scores needs prune.depth_mode=list.

Each rank adds the squared norms of its own shards into global-shaped tensors (zeros
elsewhere, as aggregation.py does), and one sum over the TP, PP and DP groups (DP ranks hold
equal copies, so that sum is divided out) gives the same scores for any layout.
"""

import dataclasses
from typing import Dict, List

import torch

from megatron_minitron.config.importance import ImportanceConfig
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.importance.depth import blocks
from megatron_minitron.importance.scores import Scores, ScoresHeader, model_config_hash
from megatron_minitron.models.builder import unwrap
from megatron_minitron.models.layers import final_norm, is_fused_norm, layers, word_embeddings
from megatron_minitron.models.output_layer import output_weight
from megatron_minitron.runtime.collectives import all_reduce_sum


def _header(model: ModelConfig, source: str, ctx, **extra) -> ScoresHeader:
    return ScoresHeader(
        model_config_hash=model_config_hash(model), model=dataclasses.asdict(model),
        num_samples=0, seq_aggregation="none", sample_aggregation="none", source=source,
        layout={"tp": ctx.tp_size, "pp": ctx.pp_size, "dp": ctx.dp_size}, **extra)


def random_scores(model: ModelConfig, cfg: ImportanceConfig, seed: int, ctx) -> Scores:
    """Uniform scores drawn from `seed` alone: the same on every rank and for every layout."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *shape: torch.rand(*shape, generator=g)  # noqa: E731
    L = model.num_layers
    heads = r(L, model.num_attention_heads)
    tensors = {
        "mlp.neurons": r(L, model.ffn_hidden_size),
        "attention.heads": heads,
        # [L, nq] -> [L, ng, nq/ng] -> [L, ng]
        "attention.query_groups": heads.reshape(L, model.num_query_groups, -1).sum(dim=-1),
        "embedding.channels": r(model.hidden_size),
    }
    if cfg.depth_cosine:
        tensors["layers.cosine"] = r(L)
    if cfg.depth_loss:
        tensors["layers.loss"] = r(L)
    sizes = sorted(set(k for k in cfg.block_sizes if k <= L))
    for k in sizes:
        tensors[f"blocks.loss.k{k}"] = r(len(blocks(L, k)))
    return Scores(tensors, _header(model, "random", ctx, data={"seed": seed}, block_sizes=sizes))


def _norm_gain(norm: torch.nn.Module, weight_name: str, zero_centered: bool) -> torch.Tensor:
    w = getattr(norm, weight_name).detach().float()
    return w + 1.0 if zero_centered else w


def _sq_rows(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().pow(2).sum(dim=1)  # [out, in] -> [out]


def _sq_cols(w: torch.Tensor) -> torch.Tensor:
    return w.detach().float().pow(2).sum(dim=0)  # [out, in] -> [in]


def magnitude_sums(chunks: List[torch.nn.Module], model: ModelConfig, tp_rank: int
                   ) -> Dict[str, torch.Tensor]:
    """This rank's squared-norm contributions, global-shaped (sum them over all ranks)."""
    L, h, f = model.num_layers, model.hidden_size, model.ffn_hidden_size
    nq, ng, hn, hpg = (model.num_attention_heads, model.num_query_groups, model.kv_channels,
                       model.heads_per_group)
    device = next(unwrap(chunks[0]).parameters()).device
    z = lambda *shape: torch.zeros(*shape, dtype=torch.float32, device=device)  # noqa: E731
    s = {"fc1": z(L, f), "fc2": z(L, f), "value": z(L, ng), "proj": z(L, nq),
         "writes": z(h), "reads": z(h)}
    zc = bool(getattr(unwrap(chunks[0]).config, "layernorm_zero_centered_gamma", False))
    for layer in layers(chunks):
        i = layer.number - 1
        # fc1: [(2)f/tp, h] -> [(2), f/tp, h]; the gated halves are [gate; up] on every rank
        halves = layer.linear_fc1.weight.reshape(2 if model.gated_linear_unit else 1, -1, h)
        f_loc = halves.shape[1]
        s["fc1"][i, tp_rank * f_loc:(tp_rank + 1) * f_loc] += \
            halves.detach().float().pow(2).sum(dim=(0, 2))
        s["fc2"][i, tp_rank * f_loc:(tp_rank + 1) * f_loc] += _sq_cols(layer.linear_fc2.weight)
        # qkv: [ng/tp * (hpg+2) * hn, h] -> [ng/tp, hpg+2, hn, h]; slot hpg+1 holds v
        per_group = layer.linear_qkv.weight.reshape(-1, hpg + 2, hn, h)
        g_loc = per_group.shape[0]
        s["value"][i, tp_rank * g_loc:(tp_rank + 1) * g_loc] += \
            per_group[:, hpg + 1].detach().float().pow(2).sum(dim=(1, 2))
        # proj: [h, nq/tp * hn] -> [nq/tp] per head
        proj_cols = _sq_cols(layer.linear_proj.weight).reshape(-1, hn).sum(dim=-1)
        s["proj"][i, tp_rank * proj_cols.numel():(tp_rank + 1) * proj_cols.numel()] += proj_cols
        s["writes"] += _sq_rows(layer.linear_proj.weight) + _sq_rows(layer.linear_fc2.weight)
        for linear, norm, name in ((layer.linear_qkv, layer.input_layernorm, "weight"),
                                   (layer.linear_fc1, layer.pre_mlp_layernorm, "weight")):
            if is_fused_norm(linear):
                norm, name = linear, "layer_norm_weight"
            s["reads"] += _norm_gain(norm, name, zc).pow(2) * _sq_cols(linear.weight)
    for c in chunks:
        gpt = unwrap(c)
        if gpt.pre_process:  # vocab-parallel rows: column norms sum over TP ranks
            s["writes"] += _sq_cols(word_embeddings(gpt).weight)
        if gpt.post_process:
            s["reads"] += _norm_gain(final_norm(gpt), "weight", zc).pow(2) * \
                _sq_cols(output_weight(gpt))
    return s


def magnitude_scores(chunks: List[torch.nn.Module], model: ModelConfig, ctx) -> Scores:
    """Weight-magnitude width scores of the model in `chunks`, identical on every rank."""
    s = magnitude_sums(chunks, model, ctx.tp_rank)
    all_reduce_sum(s.values(), ctx)
    norm = {k: (v / ctx.dp_size).sqrt() for k, v in s.items()}
    # [L, ng] -> [L, ng, hpg] -> [L, nq]: each head's value vectors are its group's
    value = norm["value"].repeat_interleave(model.heads_per_group, dim=1)
    heads = value * norm["proj"]
    tensors = {
        "mlp.neurons": norm["fc1"] * norm["fc2"],
        "attention.heads": heads,
        # [L, nq] -> [L, ng, nq/ng] -> [L, ng]
        "attention.query_groups": heads.reshape(model.num_layers, model.num_query_groups,
                                                -1).sum(dim=-1),
        "embedding.channels": norm["writes"] * norm["reads"],
    }
    return Scores({k: v.cpu() for k, v in tensors.items()}, _header(model, "magnitude", ctx))
