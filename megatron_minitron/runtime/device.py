"""Device choice and the Transformer-Engine probe."""

import importlib.util
import os
import sys
from pathlib import Path
from typing import Optional

import torch

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.parallel import RuntimeConfig


def resolve_device(cfg: RuntimeConfig) -> torch.device:
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("runtime.device", "cuda requested but no CUDA device is visible",
                          "set runtime.device=cpu or auto")
    if cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))


def resolve_precision(cfg: RuntimeConfig, device_type: Optional[str] = None) -> str:
    """'fp32' or 'bf16'. "auto" is bf16 on CUDA (tensor cores, half the activation memory) and
    fp32 on CPU, where bf16 matmuls are slow and only tests use it."""
    if cfg.precision != "auto":
        return cfg.precision
    device_type = device_type or resolve_device(cfg).type
    return "bf16" if device_type == "cuda" else "fp32"


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


_said = set()


def say_once(message: str) -> None:
    """A choice made for the user, told once per process on stderr (rank 0 only)."""
    if message not in _said and os.environ.get("RANK", "0") == "0":
        _said.add(message)
        print(message, file=sys.stderr)
