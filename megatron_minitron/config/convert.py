"""ConvertConfig: Hugging Face <-> megatron checkpoint conversion (`minitron convert`)."""

from dataclasses import dataclass
from typing import Optional

from megatron_minitron.config.errors import ConfigError

DIRECTIONS = ("hf_to_mcore", "mcore_to_hf")
DTYPES = ("bfloat16", "float16", "float32")
MODEL_TYPES = ("auto", "llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2",
               "gemma3_text")


@dataclass
class ConvertConfig:
    """One conversion. Checkpoints reshard on load, so no target TP/PP is needed here."""

    direction: str = "hf_to_mcore"
    """"hf_to_mcore" (HF folder -> our checkpoint) or "mcore_to_hf"."""
    input: Optional[str] = None
    """HF model folder (hf_to_mcore; "smollm2" and "gemma3_270m" mean the embedded teachers,
    pipeline.teacher), or our checkpoint folder (mcore_to_hf)."""
    output: Optional[str] = None
    """Checkpoint root (hf_to_mcore) or HF folder (mcore_to_hf) to write."""
    dtype: Optional[str] = None
    """Tensor dtype of the exported safetensors (mcore_to_hf): bfloat16, float16 or float32.
    None: the dtype the model was imported from Hugging Face in (its header records it), else
    float32, so a round trip is bit-exact. Import keeps fp32 masters."""
    model_type: str = "auto"
    """HF family to export as: llama, mistral, qwen2, qwen3, phi3, gemma, gemma2, gemma3_text
    or "auto" (the family the checkpoint was imported from, else the Gemma
    generation whose parts it has, qwen3 when it has qk_layernorm, qwen2 when it has QKV
    biases, else llama)."""

    def __post_init__(self):
        if self.direction not in DIRECTIONS:
            raise ConfigError("convert.direction", f"unknown {self.direction!r}",
                              f"use one of {DIRECTIONS}")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ConfigError("convert.dtype", f"unknown {self.dtype!r}", f"use one of {DTYPES}")
        if self.model_type not in MODEL_TYPES:
            raise ConfigError("convert.model_type", f"unknown {self.model_type!r}",
                              f"use one of {MODEL_TYPES}")

    def check_paths(self) -> None:
        """Paths are checked when a conversion runs (the section composes without them)."""
        for name in ("input", "output"):
            if not getattr(self, name):
                raise ConfigError(f"convert.{name}", "not set", f"pass convert.{name}=PATH")
