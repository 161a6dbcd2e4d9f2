"""Device choice and the Transformer-Engine probe."""

import importlib.util
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.parallel import RuntimeConfig
from megatron_minitron.runtime.console import console_stderr
from megatron_minitron.runtime.rank import is_rank0


def resolve_device(cfg: RuntimeConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device", "cuda requested but no CUDA device is visible",
                          "set runtime.device=cpu or auto")
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


CPU_BF16_FLAGS = ("amx_bf16", "avx512_bf16")
"""/proc/cpuinfo flags of CPUs that compute bf16 matmuls natively. torch's own
`torch.ops.mkldnn._is_mkldnn_bf16_supported()` is not used: it says True on AVX-512 CPUs without
either flag, where bf16 is emulated: a 1024 x 1024 x 1024 bf16 matmul took 178x the fp32 time
on a 2-core AMD EPYC with AVX2 and no AVX-512 (2026-12-07, torch 2.13 CPU wheel, 2 threads,
median of 5 rounds), and bf16 runs 3-4x slower than fp32 on an Intel Xeon without bf16."""


@dataclass(frozen=True)
class PrecisionChoice:
    """What runtime.precision resolved to on this machine, and why (written to config.yaml)."""

    precision: str
    reason: str


CPU_FLAGS_ENV = "MINITRON_CPU_FLAGS"
"""Environment variable that replaces /proc/cpuinfo's flags in the precision choice: the flags
separated by spaces or commas (`avx512_bf16`, or `none` for a CPU without bf16). The tests use
it to take both the native-bf16 and the emulated path on any machine; every choice made from it
says so in its reason."""


def cpu_flags() -> Optional[frozenset]:
    """The CPU's feature flags: MINITRON_CPU_FLAGS where set, else /proc/cpuinfo's, or None
    where there is no such file."""
    override = os.environ.get(CPU_FLAGS_ENV)
    if override is not None:
        return frozenset(w for w in override.replace(",", " ").split() if w != "none")
    return cpuinfo_flags()


def cpuinfo_flags() -> Optional[frozenset]:
    """/proc/cpuinfo's feature flags, whatever MINITRON_CPU_FLAGS says (what a benchmark
    reports of the machine), or None where there is no such file."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return frozenset(w for line in text.splitlines() if line.startswith("flags")
                     for w in line.split(":", 1)[1].split())


def _flags_source(given: bool) -> str:
    if given or CPU_FLAGS_ENV not in os.environ:
        return ""
    return f" ({CPU_FLAGS_ENV}={os.environ[CPU_FLAGS_ENV]!r}, not /proc/cpuinfo)"


def native_bf16(device_type: str, flags: Optional[frozenset] = None,
                capability: Optional[Tuple[int, int]] = None) -> Tuple[bool, str]:
    """(True if this device computes bf16 natively, the reason in words)."""
    if device_type == "cuda":
        if capability is None and torch.cuda.is_available():
            capability = torch.cuda.get_device_capability()
        if capability is None:
            return True, "CUDA device (compute capability not readable here; assumed >= 8.0)"
        cc = f"{capability[0]}.{capability[1]}"
        if tuple(capability) >= (8, 0):
            return True, f"CUDA compute capability {cc} >= 8.0 has bf16 tensor cores"
        return False, f"CUDA compute capability {cc} < 8.0 has no bf16 tensor cores"
    source = _flags_source(flags is not None)
    flags = cpu_flags() if flags is None else flags
    if flags is None:
        return False, "CPU flags unreadable (no /proc/cpuinfo): bf16 may be emulated"
    found = [f for f in CPU_BF16_FLAGS if f in flags]
    if found:
        return True, f"CPU has {'+'.join(found)}{source}"
    return False, ("CPU has neither " + " nor ".join(CPU_BF16_FLAGS) + source +
                   ": bf16 would be emulated, several times slower than fp32")


def choose_precision(cfg: RuntimeConfig, device_type: Optional[str] = None,
                     flags: Optional[frozenset] = None,
                     capability: Optional[Tuple[int, int]] = None) -> PrecisionChoice:
    """runtime.precision on this machine. "auto" is bf16 where the hardware computes it
    natively (AMX-BF16 or AVX512-BF16 CPUs, CUDA compute capability >= 8.0), else fp32. An
    explicit choice is kept; bf16 on a CPU that emulates it is said once on stderr."""
    device_type = device_type or resolve_device(cfg).type
    native, why = native_bf16(device_type, flags, capability)
    if cfg.precision == "auto":
        chosen = "bf16" if native else "fp32"
        say_once(f"minitron: runtime.precision=auto chose {chosen}: {why}")
        return PrecisionChoice(chosen, f"auto: {why}")
    if cfg.precision == "bf16" and not native:
        say_once(f"minitron: warning: runtime.precision=bf16 on a {why}; "
                 "set runtime.precision=auto (fp32 here) for speed")
    return PrecisionChoice(cfg.precision, f"set explicitly ({why})")


def resolve_precision(cfg: RuntimeConfig, device_type: Optional[str] = None) -> str:
    """'fp32' or 'bf16' (choose_precision without the reason)."""
    return choose_precision(cfg, device_type).precision


def transformer_engine_status() -> str:
    """'ok', or why Transformer-Engine cannot be used here."""
    spec = importlib.util.find_spec("transformer_engine")
    if spec is None:
        return "transformer_engine is not installed (pip install .[gpu], or use the NGC image)"
    if spec.origin is None:  # an empty leftover folder imports as a namespace package
        locs = ", ".join(str(Path(p)) for p in (spec.submodule_search_locations or []))
        return (f"transformer_engine resolves to an empty namespace package at {locs} "
                "(a leftover folder); delete it or reinstall transformer-engine")
    if not torch.cuda.is_available():
        return "transformer_engine needs CUDA, and no CUDA device is visible"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as e:  # TE raises many kinds when its libraries do not match
        return f"transformer_engine failed to import: {type(e).__name__}: {e}"
    return "ok"


def resolve_transformer_impl(cfg: RuntimeConfig) -> str:
    """'local' or 'transformer_engine'. Explicitly asking for TE where it cannot load is an error."""
    if cfg.transformer_impl == "local":
        return "local"
    status = transformer_engine_status()
    if cfg.transformer_impl == "transformer_engine":
        if status != "ok":
            raise ConfigError("runtime.transformer_impl", status,
                              "set runtime.transformer_impl=local (or auto)")
        return "transformer_engine"
    impl = "transformer_engine" if status == "ok" else "local"
    say_once(f"minitron: runtime.transformer_impl=auto chose {impl}: " + (
        "Transformer-Engine imports and CUDA is visible" if status == "ok" else status))
    return impl


def resolve_attention_impl(cfg: RuntimeConfig) -> str:
    """'sdpa' or 'megatron': the core attention of the local layer spec ("auto" is sdpa;
    Transformer-Engine layers bring their own fused attention and ignore this)."""
    if cfg.attention_impl != "auto":
        return cfg.attention_impl
    say_once("minitron: runtime.attention_impl=auto chose sdpa: torch's fused "
             "scaled_dot_product_attention and our rotary and SwiGLU kernels in the local "
             "layer spec (megatron: its unfused ones)")
    return "sdpa"


_said = set()


def say_once(message: str) -> None:
    """A choice made for the user, told once per process on stderr (rank 0 only)."""
    if message not in _said and is_rank0():
        _said.add(message)
        print(message, file=console_stderr())
