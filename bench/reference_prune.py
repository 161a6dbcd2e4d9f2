"""A straightforward reference implementation of Minitron's activation-based width pruning in
plain transformers, the baseline a user could write from the paper: forward hooks on the Hugging
Face teacher over calibration batches; importance = mean |activation| over all calibration
tokens of each MLP neuron (input of down_proj) and of each hidden channel (summed over every
RMSNorm output: input/post-attention norms of all layers and the final norm); keep the top-k
(per layer for MLP neurons, one set for the hidden channels) and slice the weights. Heads and
layers are kept, as in our default student.

    reference_prune(teacher_hf, out_dir, hidden_size, ffn_hidden_size, batches)

batches: an iterable of [micro_batch, seq] token tensors (the calibration set).
"""

from pathlib import Path

import torch


@torch.no_grad()
def reference_prune(teacher_hf: str, out_dir: str, hidden_size: int, ffn_hidden_size: int,
                    batches) -> str:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(teacher_hf, dtype=torch.float32).eval()
    layers = model.model.layers
    ffn = [torch.zeros(model.config.intermediate_size) for _ in layers]
    hidden = torch.zeros(model.config.hidden_size)
    counts = {"tokens": 0}

    def ffn_hook(i):
        def hook(module, args):
            ffn[i].add_(args[0].abs().flatten(0, -2).sum(0))
        return hook

    def hidden_hook(module, args, out):
        hidden.add_(out.abs().flatten(0, -2).sum(0))

    handles = [layer.mlp.down_proj.register_forward_pre_hook(ffn_hook(i))
               for i, layer in enumerate(layers)]
    norms = [m for layer in layers for m in (layer.input_layernorm,
                                             layer.post_attention_layernorm)]
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
    for i, layer in enumerate(layers):
        keep_f = torch.topk(ffn[i] / counts["tokens"], ffn_hidden_size).indices.sort().values
        attn, mlp = layer.self_attn, layer.mlp
        for lin in (attn.q_proj, attn.k_proj, attn.v_proj):
            lin.weight = torch.nn.Parameter(lin.weight[:, keep_h].clone())
        attn.o_proj.weight = torch.nn.Parameter(attn.o_proj.weight[keep_h].clone())
        for lin in (mlp.gate_proj, mlp.up_proj):
            lin.weight = torch.nn.Parameter(lin.weight[keep_f][:, keep_h].clone())
        mlp.down_proj.weight = torch.nn.Parameter(mlp.down_proj.weight[keep_h][:, keep_f].clone())
    model.config.head_dim = model.config.hidden_size // model.config.num_attention_heads
    model.config.hidden_size, model.config.intermediate_size = hidden_size, ffn_hidden_size
    model.lm_head.weight = model.model.embed_tokens.weight  # tied, as in SmolLM2
    model.save_pretrained(out_dir)
    AutoTokenizer.from_pretrained(teacher_hf).save_pretrained(out_dir)
    return str(Path(out_dir))
