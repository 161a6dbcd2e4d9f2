"""What `minitron cache-teacher` keeps of one sample's teacher distributions: the math.

Input: the teacher's logits of one sample over the real vocabulary, `[s, v]` fp32, already
divided by the cache temperature (the writer gathers the TP shards first, so the records do not
depend on the layout that wrote them). Output: numpy arrays in their storage dtypes.

- top-k: ids `[s, k]`, log-probabilities `[s, k]`, log of the tail mass `[s]` (logsumexp of
  the log-probabilities outside the top-k: exact, not 1 - sum).
- sampled: k draws from the softmax (inverse CDF of uniforms from a generator seeded by the
  sample's key, so a resumed or re-laid-out write draws the same tokens), stored as distinct
  ids `[s, k]` (sorted, distinct first, then id 0 with count 0) with counts `[s, k]` uint8, and
  the teacher's entropy `[s]` (for reporting the KL estimate)."""

from typing import Dict

import numpy as np
import torch


def id_dtype(vocab_size: int) -> np.dtype:
    """16-bit ids up to 65,536 tokens (SmolLM2's 49,152), else 32-bit."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def topk_record(logp: torch.Tensor, k: int, value_dtype: np.dtype) -> Dict[str, np.ndarray]:
    """logp: `[s, v]` teacher log-probabilities."""
    vals, ids = logp.topk(k, dim=-1)  # [s, k]
    tail = torch.logsumexp(logp.scatter(-1, ids, float("-inf")), dim=-1)  # [s]
    return {"topk_ids": ids.numpy().astype(id_dtype(logp.shape[-1])),
            "topk_logp": vals.numpy().astype(value_dtype),
            "topk_tail": tail.numpy().astype(value_dtype)}


def sampled_record(logp: torch.Tensor, k: int, generator: torch.Generator,
                   value_dtype: np.dtype) -> Dict[str, np.ndarray]:
    """logp: `[s, v]` teacher log-probabilities; k draws per position."""
    s, v = logp.shape
    p = logp.exp()
    cdf = p.cumsum(dim=-1)  # [s, v]
    u = torch.rand(s, k, generator=generator, dtype=torch.float64).float()
    ids = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=v - 1)
    ids = ids.sort(dim=-1).values  # [s, k]
    first = torch.ones_like(ids, dtype=torch.bool)
    first[:, 1:] = ids[:, 1:] != ids[:, :-1]
    pos = torch.arange(k).expand(s, k)
    starts = torch.where(first, pos, k)
    # for each slot, the start of the next run: reversed running minimum of later starts
    later = torch.cat([starts[:, 1:], torch.full((s, 1), k)], dim=-1)
    next_start = later.flip(-1).cummin(dim=-1).values.flip(-1)
    counts = torch.where(first, next_start - pos, 0)
    order = torch.argsort((~first).to(torch.int8), dim=-1, stable=True)  # distinct ids first
    ids, counts = ids.gather(-1, order), counts.gather(-1, order)
    ids = torch.where(counts > 0, ids, 0)
    entropy = -torch.where(p > 0, p * logp, 0.0).sum(dim=-1)
    return {"sampled_ids": ids.numpy().astype(id_dtype(v)),
            "sampled_counts": counts.numpy().astype(np.uint8),
            "entropy": entropy.numpy().astype(value_dtype)}


def sample_generator(seed: int, split: int, sample: int) -> torch.Generator:
    """The draws of one sample depend on (seed, split, sample index) only."""
    import hashlib

    h = hashlib.blake2b(f"{seed}:{split}:{sample}".encode(), digest_size=8).digest()
    return torch.Generator().manual_seed(int.from_bytes(h, "little") & (2**63 - 1))


def token_hash(tokens: torch.Tensor) -> np.uint64:
    """8-byte hash of one sample's input tokens: the cache's check that it is read for the
    sample it was written for."""
    import hashlib

    data = tokens.detach().cpu().to(torch.int64).numpy().tobytes()
    return np.frombuffer(hashlib.blake2b(data, digest_size=8).digest(), dtype=np.uint64)[0]
