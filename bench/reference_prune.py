"""A straightforward reference implementation of Minitron's activation-based width pruning in
plain transformers, the baseline a user could write from the paper: forward hooks on the Hugging
Face teacher over calibration batches; importance = mean |activation| over all calibration
tokens of each MLP neuron (input of down_proj) and of each hidden channel (summed over every
RMSNorm output of the hidden width: each layer's input / post-attention norms, Gemma's pre- and
post-feed-forward norms too, and the final norm); with num_attention_heads, each query head's
importance is the L2 norm of its slice of o_proj's input summed over the calibration tokens;
keep the top-k (per layer for MLP neurons and heads, one set for the hidden channels) and slice
the weights (q_proj rows and o_proj columns of the dropped heads; key/value heads and the q/k
norms, which are head_dim wide, stay whole). Layers are kept; head_dim stays what it was.

    reference_prune(teacher_hf, out_dir, hidden_size, ffn_hidden_size, batches,
                    num_attention_heads=None)

batches: an iterable of [micro_batch, seq] token tensors (the calibration set).
num_attention_heads: None keeps every head (SmolLM2's students); a smaller count keeps that
many query heads per layer, for models with one key/value group (Gemma 3 270M), where any
subset of the query heads shares it.
"""

from pathlib import Path
from typing import Optional

import torch


@torch.no_grad()
def reference_prune(teacher_hf: str, out_dir: str, hidden_size: int, ffn_hidden_size: int,
                    batches, num_attention_heads: Optional[int] = None) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_hf, dtype=torch.float32).eval()
    cfg = model.config
    layers = model.model.layers
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    if num_attention_heads is not None and num_attention_heads < heads and \
            cfg.num_key_value_heads != 1:
        raise ValueError("reference_prune drops query heads only with one key/value group")
    ffn = [torch.zeros(cfg.intermediate_size) for _ in layers]
    head_norms = [torch.zeros(heads) for _ in layers]
    hidden = torch.zeros(cfg.hidden_size)
    counts = {"tokens": 0}

    def ffn_hook(i):
        def hook(module, args):
            ffn[i].add_(args[0].abs().flatten(0, -2).sum(0))
        return hook

    def head_hook(i):
        def hook(module, args):  # o_proj's input [b, s, heads * head_dim]
            x = args[0].reshape(-1, heads, head_dim)
            head_norms[i].add_(x.norm(dim=-1).sum(0))
        return hook

    def hidden_hook(module, args, out):
        hidden.add_(out.abs().flatten(0, -2).sum(0))

    handles = [layer.mlp.down_proj.register_forward_pre_hook(ffn_hook(i))
               for i, layer in enumerate(layers)]
    handles += [layer.self_attn.o_proj.register_forward_pre_hook(head_hook(i))
                for i, layer in enumerate(layers)]
    # every norm of the hidden width: input / post-attention, and Gemma's pre / post
    # feed-forward ones (the q/k norms sit inside self_attn and are head_dim wide)
    norms = [m for layer in layers for name, m in layer.named_children()
             if name.endswith("layernorm")]
    handles += [m.register_forward_hook(hidden_hook) for m in norms + [model.model.norm]]
    for tokens in batches:
        model(input_ids=tokens)
        counts["tokens"] += tokens.numel()
    for h in handles:
        h.remove()
    keep_h = torch.topk(hidden, hidden_size).indices.sort().values
    emb = model.model.embed_tokens
    emb.weight = torch.nn.Parameter(emb.weight[:, keep_h].clone())
    for norm in norms + [model.model.norm]:
        norm.weight = torch.nn.Parameter(norm.weight[keep_h].clone())
    kept_heads = heads if num_attention_heads is None else num_attention_heads
    for i, layer in enumerate(layers):
        keep_f = torch.topk(ffn[i] / counts["tokens"], ffn_hidden_size).indices.sort().values
        keep_q = torch.topk(head_norms[i], kept_heads).indices.sort().values
        rows = (keep_q.unsqueeze(-1) * head_dim + torch.arange(head_dim)).flatten()
        attn, mlp = layer.self_attn, layer.mlp
        attn.q_proj.weight = torch.nn.Parameter(attn.q_proj.weight[rows][:, keep_h].clone())
        for lin in (attn.k_proj, attn.v_proj):
            lin.weight = torch.nn.Parameter(lin.weight[:, keep_h].clone())
        attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[keep_h][:, rows].clone())
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight = torch.nn.Parameter(lin.weight[keep_f][:, keep_h].clone())
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[keep_h][:, keep_f].clone())
    cfg.head_dim = head_dim  # explicit: a smaller hidden_size must not change it
    cfg.hidden_size, cfg.intermediate_size = hidden_size, ffn_hidden_size
    cfg.num_attention_heads = kept_heads
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_hf).save_pretrained(out_dir)
    return str(Path(out_dir))
