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


def random_hf_model(model_type: str, fields: dict, seed: int, folder, std: float = 0.05):
    """A transformers model of `model_type` with config `fields`, its weights drawn from
    N(0, std) (norm weights around 1), saved to `folder`; returned in eval mode."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.AutoConfig.for_model(model_type, **fields)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.normal_(0, std)
            if "norm" in name:
                p.add_(1.0)
    model.save_pretrained(str(folder))
    return model


def assert_same_weights(hf_dir, out) -> None:
    """Both folders' model.safetensors hold the same tensor names with equal values."""
    from safetensors.torch import load_file

    before, after = load_file(hf_dir / "model.safetensors"), load_file(out / "model.safetensors")
    assert sorted(before) == sorted(after)
    assert all(torch.equal(before[k], after[k]) for k in before)
