"""The GPU path: transformer_impl=auto picks Transformer-Engine layers, precision=auto picks bf16,
megatron-core picks a fused Adam, and `minitron train` steps such a model. Needs CUDA and TE."""

import json
import os
import subprocess
import sys

import pytest

from distributed import run_distributed

TINY = ["data.seq_length=64", "train.micro_batch_size=2", "train.global_batch_size=4",
        "train.eval_interval=0", "train.eval_iters=1", "train.optimizer.lr_warmup_iters=1",
        "logger.backend=none", "logger.progress_bar=false"]


def _needs_te():
    from megatron_minitron.runtime.device import transformer_engine_status

    status = transformer_engine_status()
    if status != "ok":
        pytest.skip(status)


def _describe(overrides):
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.models.builder import build_model, unwrap
    from megatron_minitron.runtime.distributed import initialize
    from megatron_minitron.training.optimizer import build_optimizer, wrap_ddp

    cfg = load_config(overrides)
    ctx = initialize(cfg.parallel, cfg.runtime)
    chunks = wrap_ddp(build_model(cfg.model, cfg.parallel, cfg.runtime, ctx.device))
    optimizer, _ = build_optimizer(chunks, cfg.train.optimizer, cfg.train)
    gpt = unwrap(chunks[0])
    layer = gpt.decoder.layers[0]
    inner = getattr(optimizer, "optimizer", optimizer)  # bf16: megatron's wrapper holds Adam
    return {"qkv": type(layer.self_attention.linear_qkv).__module__,
            "fc1": type(layer.mlp.linear_fc1).__module__,
            "dtype": str(layer.mlp.linear_fc1.weight.dtype),
            "device": layer.mlp.linear_fc1.weight.device.type,
            "adam": f"{type(inner).__module__}.{type(inner).__name__}"}


def test_precision_auto_is_bf16_only_where_the_hardware_has_it(capsys):
    from megatron_minitron.config.parallel import RuntimeConfig
    from megatron_minitron.runtime import device
    from megatron_minitron.runtime.device import choose_precision, resolve_precision

    auto = RuntimeConfig()
    assert auto.precision == "auto"
    plain = frozenset({"avx2", "avx512f", "avx512_vnni"})  # Ice-Lake-class: emulated bf16
    assert choose_precision(auto, "cpu", flags=plain).precision == "fp32"
    assert choose_precision(auto, "cpu", flags=plain | {"amx_bf16"}).precision == "bf16"
    assert choose_precision(auto, "cpu", flags=plain | {"avx512_bf16"}).precision == "bf16"
    assert choose_precision(auto, "cuda", capability=(9, 0)).precision == "bf16"
    assert choose_precision(auto, "cuda", capability=(8, 0)).precision == "bf16"
    assert choose_precision(auto, "cuda", capability=(7, 5)).precision == "fp32"
    assert "7.5 < 8.0" in choose_precision(auto, "cuda", capability=(7, 5)).reason
    assert "amx_bf16" in choose_precision(auto, "cpu", flags=plain | {"amx_bf16"}).reason
    fp32 = RuntimeConfig(precision="fp32")
    assert choose_precision(fp32, "cuda", capability=(9, 0)).precision == "fp32"
    here_native = device.native_bf16("cpu")[0]  # this machine's own flags
    assert resolve_precision(RuntimeConfig(device="cpu")) == ("bf16" if here_native else "fp32")
    # an explicit bf16 on a CPU that emulates it runs, and says so once
    device._said.clear()
    capsys.readouterr()
    bf16 = RuntimeConfig(precision="bf16")
    for _ in range(3):
        assert choose_precision(bf16, "cpu", flags=plain).precision == "bf16"
    err = capsys.readouterr().err
    assert err.count("emulated") == 1 and "runtime.precision" in err
    assert choose_precision(bf16, "cpu", flags=plain | {"amx_bf16"}).precision == "bf16"
    assert capsys.readouterr().err == ""


def test_shipped_experiments_leave_precision_to_the_machine():
    from pathlib import Path

    import yaml

    for f in sorted((Path(__file__).parents[1] / "conf" / "experiment").glob("*.yaml")):
        runtime = (yaml.safe_load(f.read_text()) or {}).get("runtime") or {}
        assert runtime.get("precision", "auto") == "auto", f.name


@pytest.mark.gpu
def test_auto_picks_transformer_engine_bf16_and_a_fused_adam():
    _needs_te()
    got = run_distributed(_describe, 1, ["runtime.transformer_impl=auto"])[0]
    assert got["qkv"].startswith("megatron.core.extensions.transformer_engine"), got
    assert got["fc1"].startswith("megatron.core.extensions.transformer_engine"), got
    assert got["device"] == "cuda" and got["dtype"] == "torch.bfloat16", got
    assert got["adam"].startswith(("transformer_engine.", "apex.")), got


@pytest.mark.gpu
def test_train_steps_the_transformer_engine_model(tmp_path):
    _needs_te()
    env = {k: v for k, v in os.environ.items()
           if k not in {"MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK"}}
    p = subprocess.run([sys.executable, "-m", "megatron_minitron.cli.main", "train", *TINY,
                        "train.train_iters=8", "runtime.device=cuda", f"run.dir={tmp_path}"],
                       env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr
    losses = [json.loads(line)["lm_loss"] for line in (tmp_path / "metrics.jsonl").open()
              if "lm_loss" in json.loads(line)]
    assert len(losses) == 8 and all(0 < x < 10 for x in losses)
    assert losses[-1] < losses[0]
