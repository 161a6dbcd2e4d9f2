"""Run megatron-core on a machine without CUDA.

megatron-core 0.16 hard-codes CUDA in a handful of places that matter for us:
  * factory calls with ``device=torch.cuda.current_device()`` or ``device="cuda"`` (tensor
    parallel layers, the pipeline schedules' token counters, p2p shape exchange);
  * ``tensor.cuda()`` / ``.to("cuda")`` on buffers (the DDP bucket grads, the optimizer);
  * the CUDA RNG tracker (``torch.cuda.get_rng_state``/``manual_seed`` and megatron's own
    ``_get_cuda_rng_state``/``_set_cuda_rng_state``), which the tensor parallel dropout forks;
  * ``torch.cuda.synchronize``, ``current_device``, ``device_count``, streams and events;
  * ``param.type() == 'torch.cuda.FloatTensor'`` asserts in the optimizer and grad clipping.

``install()`` maps every one of those onto the CPU: a ``TorchFunctionMode`` rewrites CUDA device
arguments to CPU, and a short list of attribute patches covers the rest. The CUDA "RNG state" is
the CPU default generator's state, so the RNG tracker forks and restores exactly as it does on
GPU. Nothing is installed when CUDA is available. ``tests/test_cpu_compat.py`` pins the list
below against megatron-core: if an upgrade adds a CUDA call we do not cover, it fails.
"""

import contextlib
from typing import Any, Callable, Dict, List, Tuple

import torch
from torch.overrides import TorchFunctionMode

_CPU = torch.device("cpu")
_installed: List[Tuple[Any, str, Any]] = []
_mode: "CudaToCpuMode | None" = None


def _is_cuda(device: Any) -> bool:
    if isinstance(device, torch.device):
        return device.type == "cuda"
    if isinstance(device, str):
        return device.startswith("cuda")
    # An int device index means a CUDA ordinal to torch's factory functions.
    return isinstance(device, int) and not isinstance(device, bool)


class CudaToCpuMode(TorchFunctionMode):
    """Rewrites CUDA devices to CPU in every torch function call (factories, .to, .cuda)."""

    def __torch_function__(self, func: Callable, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if "device" in kwargs and _is_cuda(kwargs["device"]):
            kwargs["device"] = _CPU
        name = getattr(func, "__name__", "")
        if name == "cuda":  # Tensor.cuda(): already on the CPU
            return args[0]
        if name == "to" and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        if name in ("pin_memory",):
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs:
            # megatron's optimizer asserts param.type() == 'torch.cuda.FloatTensor'.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


class _NullStream:
    """Stand-in for torch.cuda.Stream/Event: every method is a no-op."""

    def __init__(self, *args, **kwargs):
        pass

    def __getattr__(self, name):
        return lambda *a, **k: None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _get_rng_state(device: Any = "cuda", clone: bool = False, graph_safe: bool = False):
    state = torch.get_rng_state()
    return state.clone() if clone else state


def _set_rng_state(new_state: torch.Tensor, device: Any = -1, graph_safe: bool = False):
    torch.set_rng_state(new_state)


def _patches() -> Dict[Tuple[Any, str], Any]:
    """(owner, attribute) -> replacement. The complete list of what install() changes."""
    from megatron.core.tensor_parallel import random as mrandom

    cuda = torch.cuda
    return {
        (cuda, "current_device"): lambda: 0,
        (cuda, "device_count"): lambda: 1,
        (cuda, "set_device"): lambda *a, **k: None,
        (cuda, "synchronize"): lambda *a, **k: None,
        (cuda, "empty_cache"): lambda: None,
        (cuda, "get_rng_state"): _get_rng_state,
        (cuda, "set_rng_state"): _set_rng_state,
        (cuda, "manual_seed"): lambda seed: None,  # the CPU generator is seeded by our caller
        (cuda, "manual_seed_all"): lambda seed: None,
        (cuda, "Stream"): _NullStream,
        (cuda, "Event"): _NullStream,
        (cuda, "current_stream"): lambda *a, **k: _NullStream(),
        (cuda, "stream"): lambda *a, **k: contextlib.nullcontext(),
        (cuda, "max_memory_allocated"): lambda *a, **k: 0,
        (cuda, "memory_allocated"): lambda *a, **k: 0,
        (mrandom, "_get_cuda_rng_state"): _get_rng_state,
        (mrandom, "_set_cuda_rng_state"): _set_rng_state,
    }


def _tracker_add(self, name: str, seed: int) -> None:
    """CudaRNGStatesTracker.add on CPU: seed a state without disturbing the default one."""
    if seed in self.seeds_:
        raise Exception(f"seed {seed} already exists")
    self.seeds_.add(seed)
    if name in self.states_:
        raise Exception(f"cuda rng state {name} already exists")
    orig = torch.get_rng_state()
    torch.manual_seed(seed)
    self.states_[name] = torch.get_rng_state()
    torch.set_rng_state(orig)


def is_installed() -> bool:
    return _mode is not None


def install() -> None:
    """Map megatron-core's CUDA calls to CPU for this process. Idempotent."""
    global _mode
    if _mode is not None:
        return
    from megatron.core.tensor_parallel.random import CudaRNGStatesTracker

    patches = _patches()
    patches[(CudaRNGStatesTracker, "add")] = _tracker_add
    for (owner, attr), new in patches.items():
        _installed.append((owner, attr, getattr(owner, attr, None)))
        setattr(owner, attr, new)
    _mode = CudaToCpuMode()
    _mode.__enter__()


def uninstall() -> None:
    """Undo install() (tests use it to compare with the unpatched behaviour)."""
    global _mode
    if _mode is None:
        return
    _mode.__exit__(None, None, None)
    _mode = None
    while _installed:
        owner, attr, old = _installed.pop()
        setattr(owner, attr, old)
