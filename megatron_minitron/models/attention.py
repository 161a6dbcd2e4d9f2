"""Core attention through torch's scaled_dot_product_attention, as a drop-in for megatron-core's
local DotProductAttention in the layer spec (the `core_attention` submodule).

megatron's local attention materialises the `[b*np, sq, sk]` scores (baddbmm), masks and
softmaxes them in separate passes, and repeats key/value heads for GQA: on a 2-core CPU its
forward+backward took 8x the time of SDPA's fused kernel at SmolLM2's shapes (4 x 512 tokens,
9 heads, 3 groups; measured). SDPA picks a flash kernel on CPU and on CUDA, and reads the
query groups directly (enable_gqa). Gemma's per-layer windows and soft-capping (attributes
models/gemma.py sets) run banded_attention. Cases it does not cover the same way (megatron's
own window_size, softmax offsets, attention dropout in training, packed sequences, attention
bias) run megatron's own forward, unchanged."""

from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType


class SDPAttention(DotProductAttention):
    """DotProductAttention whose forward calls F.scaled_dot_product_attention. Same
    constructor (partitioning, softmax scale and window checks are megatron's), same tensors
    in and out: query `[sq, b, np, hn]`, key/value `[sk, b, ng, hn]` -> context
    `[sq, b, np*hn]` (np heads and ng groups of this TP rank)."""

    def _megatron_only(self, attention_bias, packed_seq_params) -> bool:
        window = getattr(self.scale_mask_softmax, "window_size", None)
        dropout = self.training and self.attention_dropout.p > 0
        return (window is not None or getattr(self, "softmax_offset", None) is not None
                or dropout or attention_bias is not None or packed_seq_params is not None)

    def forward(self, query, key, value, attention_mask: Optional[torch.Tensor],
                attn_mask_type: Optional[AttnMaskType] = None, attention_bias=None,
                packed_seq_params=None):
        if self._megatron_only(attention_bias, packed_seq_params):
            return super().forward(query, key, value, attention_mask, attn_mask_type,
                                   attention_bias, packed_seq_params)
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        # [s, b, n, hn] -> [b, n, s, hn], contiguous: forward + backward ran 3 % faster on a
        # contiguous value, copy included, than on megatron's slice of the fused QKV
        # projection (bench/attention_layout.py, SmolLM2's shapes, CPU); query and key come
        # contiguous in this layout from our RoPE (models/rope.py): no copy for them
        q, k, v = (x.permute(1, 2, 0, 3).contiguous() for x in (query, key, value))
        causal = attention_mask is None and mask_type == AttnMaskType.causal
        # megatron's masks are True where attention is forbidden; SDPA's where it is allowed
        keep = None if attention_mask is None else ~attention_mask
        window = getattr(self, "sliding_window", None)  # set by models/gemma.py
        cap = getattr(self, "logit_softcapping", None)
        if window is not None or cap is not None:
            context = banded_attention(q, k, v, keep, self.softmax_scale, window, cap)
        else:
            context = F.scaled_dot_product_attention(
                q, k, v, attn_mask=keep, is_causal=causal, scale=self.softmax_scale,
                enable_gqa=q.shape[1] != k.shape[1])
        # [b, np, sq, hn] -> [sq, b, np, hn] -> [sq, b, np*hn]
        context = context.permute(2, 0, 1, 3).contiguous()
        return context.view(*context.shape[:2], self.hidden_size_per_partition)


def banded_attention(q, k, v, keep: Optional[torch.Tensor], scale: float,
                     window: Optional[int], cap: Optional[float]) -> torch.Tensor:
    """Causal attention `[b, n, s, hn]` where query i sees keys j with i - window < j <= i
    (transformers' sliding window; every earlier key without a window), `keep` (True: allowed)
    on top, and scores soft-capped to cap * tanh(scores / cap) before the mask (Gemma 2, as
    transformers' eager attention: scores, cap, mask, fp32 softmax, values)."""
    sq, sk = q.shape[2], k.shape[2]
    i = torch.arange(sq, device=q.device)[:, None] + (sk - sq)
    j = torch.arange(sk, device=q.device)[None, :]
    allowed = j <= i
    if window is not None:
        allowed = allowed & (i - j < window)
    if keep is not None:
        allowed = allowed & keep
    if cap is None:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=scale,
                                              enable_gqa=q.shape[1] != k.shape[1])
    if k.shape[1] != q.shape[1]:  # GQA: each group's key/value for its heads
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / cap) * cap
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.matmul(torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype), v)
