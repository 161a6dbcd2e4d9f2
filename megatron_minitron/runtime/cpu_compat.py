"""Run megatron-core on a machine without CUDA.

megatron-core 0.16 hard-codes CUDA in a handful of places that matter for us:
  * factory calls with ``device=torch.cuda.current_device()`` or ``device="cuda"`` (tensor
    parallel layers, the pipeline schedules' token counters, p2p shape exchange);
  * ``tensor.cuda()`` / ``.to("cuda")`` on buffers (the DDP bucket grads, the optimizer);
  * the CUDA RNG tracker (``torch.cuda.get_rng_state``/``manual_seed`` and megatron's own
    ``_get_cuda_rng_state``/``_set_cuda_rng_state``), which the tensor parallel dropout forks;
  * ``torch.cuda.synchronize``, ``current_device``, ``device_count``, streams and events;
  * ``param.type() == 'torch.cuda.FloatTensor'`` asserts in the optimizer and grad clipping;
  * backward passes: torch >= 2.10 dispatches ``torch.autograd.backward`` itself to the mode, and
    a mode is switched off while it handles a call, so custom autograd Functions' backward()
    (megatron's MoE token gather / reduce-scatter allocate on ``torch.cuda.current_device()``)
    would run unmapped: the mode runs the backward pass itself, with itself active;
  * names megatron's MoE code reads but defines only when Transformer Engine imports (the MoE
    router's ``te_general_gemm``: its pure-PyTorch branch tests it for None, and without TE it
    raises NameError instead).

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
_ABSENT = object()


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
        # Every torch call of the step passes here (thousands per step): the common case (no
        # device argument, not one of the few functions below) is two lookups and the call.
        if kwargs:
            device = kwargs.get("device")
            if device is not None and _is_cuda(device):
                kwargs = dict(kwargs, device=_CPU)
        else:
            kwargs = {}
        name = getattr(func, "__name__", "")
        if name not in _SPECIAL:
            return func(*args, **kwargs)
        if func is torch.autograd.backward or func is torch.Tensor.backward:
            with self:  # the custom Functions' backward() inside it: CUDA devices mapped too
                return _backward(func, args, kwargs)
        if name == "cuda":  # Tensor.cuda(): already on the CPU
            return args[0]
        if name == "to" and len(args) > 1 and _is_cuda(args[1]):
            args = (args[0], _CPU) + tuple(args[2:])
        if name == "pin_memory":
            return args[0]
        if name == "type" and len(args) == 1 and not kwargs:
            # megatron's optimizer asserts param.type() == 'torch.cuda.FloatTensor'.
            return func(*args).replace("torch.", "torch.cuda.", 1)
        return func(*args, **kwargs)


_SPECIAL = frozenset({"backward", "cuda", "to", "pin_memory", "type"})
"""Names of the functions CudaToCpuMode does more for than map a device keyword."""


def _backward(func: Callable, args, kwargs) -> None:
    """torch.autograd.backward's own body (torch 2.13), without its torch-function dispatch
    (which would hand the call straight back to the mode and switch the mode off)."""
    import inspect

    from torch.autograd import _make_grads, _tensor_or_tensors_to_tuple
    from torch.autograd.graph import _engine_run_backward

    a = inspect.signature(func).bind(*args, **kwargs).arguments
    tensors = a.get("tensors", a.get("self"))
    grads = a.get("grad_tensors", a.get("gradient"))
    create_graph = bool(a.get("create_graph", False))
    retain_graph = a.get("retain_graph")
    inputs = a.get("inputs")
    tensors = (tensors,) if torch.is_tensor(tensors) else tuple(tensors)
    inputs = () if inputs is None else (inputs,) if torch.is_tensor(inputs) else tuple(inputs)
    grads = _make_grads(tensors, _tensor_or_tensors_to_tuple(grads, len(tensors)),
                        is_grads_batched=False)
    _engine_run_backward(tensors, grads, create_graph if retain_graph is None else retain_graph,
                         create_graph, inputs, allow_unreachable=True, accumulate_grad=True)


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


def _undefined_without_te() -> List[Tuple[Any, str]]:
    """(module, name) pairs megatron-core reads but binds only inside its TE import block."""
    from megatron.core.transformer.moe import moe_utils

    return [(moe_utils, "te_general_gemm")]


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
    for owner, attr in _undefined_without_te():
        if not hasattr(owner, attr):  # None selects megatron's own torch.mm branch
            _installed.append((owner, attr, _ABSENT))
            setattr(owner, attr, None)
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
        if old is _ABSENT:
            delattr(owner, attr)
        else:
            setattr(owner, attr, old)
