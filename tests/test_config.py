"""Every shipped config composes and validates; bad input names the field and the fix."""

from pathlib import Path

import pytest

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.loader import conf_dir, load_config


def _options(group):
    return sorted(p.stem for p in (conf_dir() / group).glob("*.yaml"))


@pytest.mark.parametrize("model", _options("model"))
def test_every_model_config_composes(model):
    cfg = load_config([f"model={model}"])
    assert cfg.model.num_layers > 0
    assert cfg.model.padded_vocab_size % cfg.model.make_vocab_size_divisible_by == 0


@pytest.mark.parametrize("experiment", _options("experiment"))
def test_every_experiment_composes(experiment):
    load_config([f"experiment={experiment}"])


@pytest.mark.parametrize("overrides,field", [
    (["+model.hidden_sizee=3"], "model.hidden_sizee"),
    (["+nonsense=1"], "nonsense"),
    (["model.num_query_groups=3"], "model.num_query_groups"),
    (["parallel.tensor_model_parallel_size=3"], "model.num_attention_heads"),
    (["parallel.pipeline_model_parallel_size=3"], "model.num_layers"),
    (["runtime.transformer_impl=fast"], "runtime.transformer_impl"),
    (["runtime.precision=fp8"], "runtime.precision"),
    (["importance.precision=bf16"], "importance.precision"),
    (["train.global_batch_size=0"], "train.global_batch_size"),
    (["data.split='1,2'"], "data.split"),
    (["model.foo=1"], "model.foo"),
    (["model.hidden_size=abc"], "model.hidden_size"),
    (["model.hidden_size=90", "model.kv_channels=null"], "model.kv_channels"),
])
def test_bad_config_names_the_field(overrides, field):
    with pytest.raises(ConfigError) as e:
        load_config(overrides)
    assert e.value.field == field
    assert "Fix:" in str(e.value)


def test_world_size_must_divide_by_tp_pp():
    cfg = load_config(["parallel.tensor_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        cfg.parallel.check_world_size(3)
    assert cfg.parallel.check_world_size(4) == 2


def test_global_batch_must_divide_by_micro_batch_times_dp():
    cfg = load_config(["train.micro_batch_size=3", "train.global_batch_size=8"])
    with pytest.raises(ConfigError, match="global_batch_size"):
        cfg.train.num_microbatches(1)


def test_transformer_engine_on_request_fails_clearly_without_it():
    from megatron_minitron.runtime.device import resolve_transformer_impl, transformer_engine_status

    cfg = load_config(["runtime.transformer_impl=transformer_engine"])
    if transformer_engine_status() == "ok":
        pytest.skip("Transformer-Engine is usable here")
    with pytest.raises(ConfigError, match="runtime.transformer_impl"):
        resolve_transformer_impl(cfg.runtime)
    assert resolve_transformer_impl(load_config([]).runtime) == "local"


def test_empty_transformer_engine_folder_is_detected(tmp_path, monkeypatch):
    import sys

    from megatron_minitron.runtime.device import transformer_engine_status

    (tmp_path / "transformer_engine").mkdir()
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "transformer_engine", raising=False)
    assert "namespace package" in transformer_engine_status()


def test_param_count_matches_the_built_model():
    import torch

    from megatron_minitron.config.loader import load_config
    from megatron_minitron.models.builder import build_model
    from tests_helpers_single import single_process

    with single_process(load_config([])) as (cfg, ctx):
        for overrides in ([], ["model.share_embeddings_and_output_weights=true"],
                          ["model.add_qkv_bias=true"], ["model.normalization=LayerNorm"]):
            m = load_config(overrides).model
            chunks = build_model(m, cfg.parallel, cfg.runtime, torch.device("cpu"))
            assert sum(p.numel() for p in chunks[0].parameters()) == m.num_parameters()
