"""Forward hooks on a model's modules, registered and removed as a group."""

import torch


def first_input(args, kwargs) -> torch.Tensor:
    """The activation a linear layer is called with (positional in megatron-core and TE)."""
    return args[0] if args else next(iter(kwargs.values()))


class HookSet:
    """Forward hooks registered on __enter__ (by subclasses) and all removed on __exit__."""

    handles: list

    def __exit__(self, *exc) -> bool:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        return False
