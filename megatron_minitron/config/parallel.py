"""Parallel layout and runtime device choices."""

from dataclasses import dataclass
from typing import Optional

from megatron_minitron.config.errors import ConfigError

TRANSFORMER_IMPLS = ("auto", "local", "transformer_engine")
PRECISIONS = ("auto", "fp32", "bf16")
ATTENTION_IMPLS = ("auto", "sdpa", "megatron")
DEVICES = ("auto", "cpu", "cuda")


@dataclass
class ParallelConfig:
    """How ranks are split. Data parallel size is derived: world_size / (TP * PP)."""

    tensor_model_parallel_size: int = 1
    """Tensor parallel (TP) size: heads, query groups, ffn and vocab are split over this."""
    pipeline_model_parallel_size: int = 1
    """Pipeline parallel (PP) size: layers are split over this many stages."""
    virtual_pipeline_model_parallel_size: Optional[int] = None
    """Model chunks per pipeline stage (interleaved 1F1B); None for plain 1F1B."""
    sequence_parallel: bool = False
    """Megatron sequence parallelism (needs TP > 1)."""
    expert_model_parallel_size: int = 1
    """Expert parallel (EP) size for MoE models: each rank holds num_moe_experts / EP experts.
    The EP ranks are data-parallel ranks for the dense layers, so EP divides world / (TP x PP)."""

    def __post_init__(self):
        for name in ("tensor_model_parallel_size", "pipeline_model_parallel_size",
                     "expert_model_parallel_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"parallel.{name}", "must be >= 1", "use a positive integer")
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and (vpp < 1 or self.pipeline_model_parallel_size < 2):
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size",
                              "needs pipeline_model_parallel_size >= 2 and a value >= 1",
                              "set it to null or raise parallel.pipeline_model_parallel_size")
        if vpp is not None:
            # It runs, but its first-step loss differs from PP=1 by ~2e-3 relative on the same
            # checkpoint (tests/test_training.py parity): refuse rather than train subtly wrong.
            raise ConfigError("parallel.virtual_pipeline_model_parallel_size",
                              "interleaved pipeline stages do not yet match PP=1 numerically",
                              "set it to null (plain 1F1B pipeline)")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError("parallel.sequence_parallel", "needs TP > 1",
                              "set parallel.sequence_parallel=false")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size

    def check_world_size(self, world_size: int) -> int:
        """Return the data parallel size, or raise naming the fields to change."""
        if world_size % self.model_parallel_size:
            raise ConfigError(
                "parallel.tensor_model_parallel_size",
                f"world size {world_size} is not divisible by TP x PP = "
                f"{self.tensor_model_parallel_size} x {self.pipeline_model_parallel_size}",
                "launch a multiple of TP*PP processes or change TP/PP",
            )
        dp = world_size // self.model_parallel_size
        if dp % self.expert_model_parallel_size:
            raise ConfigError(
                "parallel.expert_model_parallel_size",
                f"EP {self.expert_model_parallel_size} does not divide the data-parallel size "
                f"{dp} (world {world_size} / TP x PP)",
                "launch EP x TP x PP processes (or a multiple) or lower EP")
        return dp


@dataclass
class RuntimeConfig:
    """Device, kernels, numerics and seed."""

    device: str = "auto"
    """"cpu", "cuda", or "auto" (cuda when available)."""
    transformer_impl: str = "auto"
    """Layer spec: "local" (pure PyTorch), "transformer_engine", or "auto" (TE when CUDA and TE
    are both present)."""
    attention_impl: str = "auto"
    """Attention kernels of the local layer spec: "sdpa" (core attention through torch's
    scaled_dot_product_attention: flash kernels on CPU and GPU, GQA without repeating key/value
    heads, models/attention.py; rotary embeddings in four element-wise kernels per pass,
    models/rope.py), "megatron" (megatron-core's DotProductAttention: scores, mask and softmax
    as separate passes; its unfused RoPE), or "auto" (sdpa). Transformer-Engine layers use TE's
    attention either way."""
    precision: str = "auto"
    """"fp32", "bf16" (megatron-core mixed precision: bf16 weights and activations, fp32 main
    weights and grads in the optimizer), or "auto": bf16 where the hardware computes it natively
    (GPUs of compute capability >= 8.0; CPUs with AMX-BF16 or AVX512-BF16), fp32 elsewhere
    (runtime.device.choose_precision; the choice and its reason go to the run's config.yaml).
    An explicit bf16 on a CPU that emulates it runs, slower, and says so once."""
    seed: int = 1234
    """Seed for weights init, dropout and data order."""
    deterministic: bool = False
    """Ask torch for deterministic algorithms (slower)."""

    def __post_init__(self):
        if self.device not in DEVICES:
            raise ConfigError("runtime.device", f"unknown {self.device!r}", f"use one of {DEVICES}")
        if self.transformer_impl not in TRANSFORMER_IMPLS:
            raise ConfigError("runtime.transformer_impl", f"unknown {self.transformer_impl!r}",
                              f"use one of {TRANSFORMER_IMPLS}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ConfigError("runtime.attention_impl", f"unknown {self.attention_impl!r}",
                              f"use one of {ATTENTION_IMPLS}")
        if self.precision not in PRECISIONS:
            raise ConfigError("runtime.precision", f"unknown {self.precision!r}",
                              f"use one of {PRECISIONS}")
