"""Random Hugging Face models converted to our checkpoints, shared by the interop tests."""

import torch

from megatron_minitron.checkpoint.hf import hf_to_mcore


def convert_all(root, names, make_hf, vocab: int, seq: int, seed: int):
    """name -> (HF folder, our checkpoint, input ids, HF fp32 logits) for each of `names`, the HF
    model made by make_hf(name, folder)."""
    ids = torch.randint(0, vocab, (2, seq), generator=torch.Generator().manual_seed(seed))
    out = {}
    for name in names:
        model = make_hf(name, root / name)
        with torch.no_grad():
            logits = model(ids).logits
        out[name] = (root / name, hf_to_mcore(str(root / name), str(root / f"{name}_mcore")),
                     ids, logits)
    return out
