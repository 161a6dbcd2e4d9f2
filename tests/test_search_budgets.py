"""Search ceilings beside the parameter budget: active parameters per token (mixture of
experts) and inference memory (weights + KV cache), alone and combined, dense and MoE."""

import dataclasses

import pytest

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.footprint import inference_memory_bytes, kv_cache_bytes
from megatron_minitron.config.model import ModelConfig
from megatron_minitron.config.moe import num_active_parameters
from megatron_minitron.config.prune import AXES, PruneConfig
from megatron_minitron.config.search import SearchConfig
from megatron_minitron.pruning.candidates import all_candidates, search_candidates
from megatron_minitron.pruning.limits import GIB

DENSE = dict(num_layers=8, hidden_size=256, ffn_hidden_size=768, num_attention_heads=8,
             num_query_groups=4, kv_channels=32, vocab_size=1000)
MOE = dict(DENSE, num_moe_experts=8, moe_ffn_hidden_size=192, moe_router_topk=2)


def _model(c, src):
    return dataclasses.replace(src, kv_channels=src.kv_channels, **c.sizes)


def test_memory_and_active_parameter_formulas():
    m = ModelConfig(**DENSE)
    # 2 (k, v) x 8 layers x 4 groups x 32 channels x 100 tokens x 3 sequences x 2 bytes
    assert kv_cache_bytes(m, 2, 100, 3) == 2 * 8 * 4 * 32 * 100 * 3 * 2
    assert inference_memory_bytes(m, "float32", 100, 3) == (
        4 * m.num_parameters() + kv_cache_bytes(m, 4, 100, 3))
    assert num_active_parameters(m) == m.num_parameters()
    moe = ModelConfig(**MOE)
    # 6 of 8 experts unused per token in each layer, each 3 x 256 x 192 (gated MLP)
    assert moe.num_parameters() - num_active_parameters(moe) == 8 * 6 * 3 * 256 * 192


@pytest.mark.parametrize("which", ["memory", "active", "both"])
@pytest.mark.parametrize("family", [DENSE, MOE])
def test_ceilings_drop_exactly_the_candidates_above_them(which, family):
    src, prune = ModelConfig(**family), PruneConfig()
    budget = int(0.6 * src.num_parameters())
    free = all_candidates(src, budget, SearchConfig(), prune)
    mems = sorted(inference_memory_bytes(_model(c, src), "bfloat16", 4096, 4) / GIB
                  for c in free)
    actives = sorted(num_active_parameters(_model(c, src)) for c in free)
    limits = {}
    if which in ("memory", "both"):
        limits.update(memory_budget_gib=mems[len(mems) // 2], memory_batch_size=4)
    if which in ("active", "both"):
        limits.update(active_param_budget=actives[len(actives) // 3])
    search = SearchConfig(**limits)
    kept = all_candidates(src, budget, search, prune)
    assert 0 < len(kept) < len(free)
    for c in free:
        m = _model(c, src)
        fits = all((which == "active" or inference_memory_bytes(m, "bfloat16", 4096, 4) / GIB
                    <= limits["memory_budget_gib"],
                    which == "memory" or num_active_parameters(m) <= limits["active_param_budget"]))
        assert (c in kept) == fits, c.name
    for c in search_candidates(src, budget, search, prune):
        assert {a: c.sizes[a] for a in AXES} == c.sizes


def test_an_impossible_ceiling_is_named_and_bad_values_refused():
    src = ModelConfig(**DENSE)
    with pytest.raises(ConfigError, match="memory_budget_gib"):
        search_candidates(src, int(0.6 * src.num_parameters()),
                          SearchConfig(memory_budget_gib=1e-6), PruneConfig())
    for kw, field in ((dict(active_param_budget=0), "search.active_param_budget"),
                      (dict(memory_budget_gib=-1.0), "search.memory_budget_gib"),
                      (dict(memory_dtype="int3"), "search.memory_dtype"),
                      (dict(memory_context_length=0), "search.memory_context_length")):
        with pytest.raises(ConfigError) as e:
            SearchConfig(**kw)
        assert e.value.field == field
