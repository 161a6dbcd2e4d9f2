"""Depth importance: how much each layer (or block of layers) changes the residual stream.

Two signals, both from forward passes:
  cosine  1 - mean over tokens of cosine(layer input hidden, layer output hidden);
  loss    LM-loss increase when a layer (or a contiguous block of k layers) is skipped, i.e.
          made to return its input (`skip_layers`).
"""

from contextlib import contextmanager
from typing import Iterable, Iterator, List, Optional

import torch
import torch.nn.functional as F

from megatron_minitron.importance.aggregation import Stats, TokenMask
from megatron_minitron.models.hooks import HookSet
from megatron_minitron.models.layers import transformer_layers


def _hidden_in(args, kwargs) -> torch.Tensor:
    return kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]


def token_cosines(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Cosine per token. # [s, b, h], [s, b, h] -> [s, b]"""
    return F.cosine_similarity(x_in.float(), x_out.float(), dim=-1)


class CosineHooks(HookSet):
    """Context manager: adds per-layer cosine sums and token counts to stats["cos_*"] over the
    tokens `mask` lets count. TP ranks see the same hidden states, so only TP rank 0
    accumulates."""

    def __init__(self, chunks: List[torch.nn.Module], stats: Stats, tp_rank: int,
                 mask: Optional[TokenMask] = None):
        self.chunks, self.stats, self.tp_rank = chunks, stats, tp_rank
        self.mask = mask or TokenMask()
        self.handles: list = []

    def _hook(self, layer, args, kwargs, output):
        cos = token_cosines(_hidden_in(args, kwargs), output[0])  # [s, b]
        i = layer.layer_number - 1
        if self.mask.value is None:
            self.stats["cos_sum"][i] += cos.double().sum()
            self.stats["cos_tokens"][i] += cos.numel()
        else:
            m = self.mask.value[..., 0]  # [s, b, 1] -> [s, b]
            self.stats["cos_sum"][i] += (cos * m).double().sum()
            self.stats["cos_tokens"][i] += m.double().sum()

    def __enter__(self) -> "CosineHooks":
        if self.tp_rank == 0:
            for layer in transformer_layers(self.chunks):
                self.handles.append(layer.register_forward_hook(self._hook, with_kwargs=True))
        return self


def _return_input(layer, args, kwargs, output):
    return (_hidden_in(args, kwargs), output[1])


@contextmanager
def skip_layers(chunks: List[torch.nn.Module], layer_numbers: Iterable[int]) -> Iterator[None]:
    """While active, the layers with these global 1-based numbers (those on this rank) return
    their input hidden states unchanged."""
    wanted = set(layer_numbers)
    handles = [layer.register_forward_hook(_return_input, with_kwargs=True)
               for layer in transformer_layers(chunks) if layer.layer_number in wanted]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def blocks(num_layers: int, k: int) -> List[List[int]]:
    """Contiguous blocks of k layers (1-based numbers); entry i starts at layer i + 1."""
    return [list(range(start, start + k)) for start in range(1, num_layers - k + 2)]
