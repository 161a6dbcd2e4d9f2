"""The on-disk teacher cache: a header, shard files, an index; and its reader.

    FOLDER/header.json     what was cached: teacher hash, data hash, mode, k, temperature,
                           vocabulary, sequence length, samples per split, storage dtypes
    FOLDER/<split>-<first sample>-<sha256[:16]>.npz
                           one writer rank's records of some samples (numpy's compressed npz,
                           zlib: no extra dependency); `samples` [n] global sample indices,
                           `token_hash` [n], then per kind [n, s, k] / [n, s] arrays
                           (cache_records.py). The name carries the file's own digest, and a
                           shard appears only by an atomic rename, so a file either is complete
                           and verifiable or is a `.tmp` left by a crash.
    FOLDER/index.json      written last: {"complete": true, "shards": {name: samples}}

Records are keyed by (split, global sample index, position): a reader at any DP / TP / PP /
micro-batch layout asks for the samples its batches hold (the batch's `sample_key`)."""

import hashlib
import json
import os
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import torch

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.data.sample_keys import SPLIT_IDS
from megatron_minitron.distill.cache_records import token_hash
from megatron_minitron.distill.cached_targets import SAMPLED, TOPK, CachedTargets
from megatron_minitron.runtime import atomic_files

HEADER, INDEX, FORMAT = "header.json", "index.json", 1


def shard_name(split: str, first_sample: int, digest: str) -> str:
    return f"{split}-{first_sample:010d}-{digest[:16]}.npz"


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_shard(folder: Path, split: str, arrays: Dict[str, np.ndarray]) -> str:
    """Write one shard atomically; its name (with its digest)."""
    tmp = atomic_files.temp_sibling(folder / f"{split}-{int(arrays['samples'][0]):010d}")
    try:
        with open(tmp, "wb") as f:
            np.savez_compressed(f, **arrays)
            f.flush()
            os.fsync(f.fileno())
        name = shard_name(split, int(arrays["samples"][0]), file_digest(tmp))
        os.replace(tmp, folder / name)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if atomic_files.is_disk_full(e):
            raise atomic_files.DiskFull(folder, sum(a.nbytes for a in arrays.values())) from e
        raise
    atomic_files.fsync_dir(folder)
    return name


def intact_shards(folder: Path) -> Dict[str, List[int]]:
    """{shard name: its sample indices} of the shards whose content matches their name;
    damaged shards and the temp files of killed writers are removed (and named on stderr)."""
    import sys

    out = {}
    atomic_files.sweep_temp(folder)
    for p in sorted(folder.glob("*-*-*.npz")):
        if file_digest(p)[:16] != p.stem.rsplit("-", 1)[-1]:
            print(f"teacher cache: {p.name} does not match its digest; rewriting its samples",
                  file=sys.stderr)
            p.unlink()
            continue
        with np.load(p) as z:
            out[p.name] = [int(i) for i in z["samples"]]
    return out


def read_json(path: Path, field: str) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(field, f"{path} cannot be read ({type(e).__name__})",
                          "point it to a folder written by `minitron cache-teacher` (which "
                          "resumes an interrupted cache)") from e


class TeacherCache:
    """Reads a complete cache. `targets(batch, estimator)` gives the CachedTargets of a
    micro-batch; shards are verified against their digest when first read and a few stay
    decompressed in memory."""

    def __init__(self, folder: str, field: str = "distill.teacher_cache", keep: int = 8):
        self.folder, self.field, self.keep = Path(folder).expanduser(), field, keep
        if not (self.folder / HEADER).is_file() or not (self.folder / INDEX).is_file():
            raise ConfigError(field, f"{folder} is not a complete teacher cache (no {HEADER} "
                              f"or no {INDEX})", "run `minitron cache-teacher` to write it "
                              "(it resumes an interrupted one)")
        self.header = read_json(self.folder / HEADER, field)
        index = read_json(self.folder / INDEX, field)
        self.where: Dict[tuple, tuple] = {}  # (split id, sample) -> (shard, row)
        for name, samples in index["shards"].items():
            split = SPLIT_IDS[name.split("-", 1)[0]]
            for row, i in enumerate(samples):
                self.where[(split, i)] = (name, row)
        self._open: "OrderedDict[str, Dict[str, np.ndarray]]" = OrderedDict()

    def estimator(self, wanted: str) -> str:
        mode = self.header["mode"]
        if wanted == "auto":
            return SAMPLED if mode in ("sampled", "both") else TOPK
        if mode not in (wanted, "both"):
            raise ConfigError("distill.teacher_cache_estimator", f"the cache at {self.folder} "
                              f"holds {mode} records, not {wanted}",
                              f"set distill.teacher_cache_estimator={mode} or auto")
        return wanted

    def _shard(self, name: str) -> Dict[str, np.ndarray]:
        if name in self._open:
            self._open.move_to_end(name)
            return self._open[name]
        p = self.folder / name
        if not p.is_file() or file_digest(p)[:16] != p.stem.rsplit("-", 1)[-1]:
            raise ConfigError(self.field, f"shard {p} is missing or damaged",
                              "run `minitron cache-teacher` again with the same settings: it "
                              "rewrites the damaged shards")
        with np.load(p) as z:
            arrays = {k: z[k] for k in z.files}
        self._open[name] = arrays
        if len(self._open) > self.keep:
            self._open.popitem(last=False)
        return arrays

    def targets(self, batch: Dict[str, torch.Tensor], kind: str) -> CachedTargets:
        """Records of the batch's samples `[b, s, k]`, flattened b-major to `[b*s, k]` (the
        order of batch_first hidden states). Checks each sample's tokens against the hash
        recorded when it was cached."""
        keys = batch["sample_key"].tolist()  # [b, 2]: (split id, sample index)
        ids, values, extra = [], [], []
        for row, (split, sample) in enumerate(keys):
            if (split, sample) not in self.where:
                raise ConfigError(self.field, f"the cache has no record of sample {sample} of "
                                  f"the {'train' if split == 0 else 'valid'} split",
                                  "cache as many samples as the run reads (same train."
                                  "train_iters, global_batch_size and eval_iters)")
            name, i = self.where[(split, sample)]
            z = self._shard(name)
            if z["token_hash"][i] != token_hash(batch["tokens"][row]):
                raise ConfigError(self.field, f"sample {sample} has other tokens than when it "
                                  "was cached", "rebuild the cache for this data (data.*, "
                                  "runtime.seed, train plan)")
            if kind == TOPK:
                ids.append(z["topk_ids"][i]), values.append(z["topk_logp"][i])
                extra.append(z["topk_tail"][i])
            else:
                counts = z["sampled_counts"][i].astype(np.float32)
                ids.append(z["sampled_ids"][i]), values.append(counts / counts.sum(-1,
                                                                                  keepdims=True))
                extra.append(z["entropy"][i])
        b, s = len(keys), ids[0].shape[0]
        # [b, s, k] -> [b*s, k]
        flat = lambda xs, dt: torch.from_numpy(  # noqa: E731
            np.stack(xs).astype(dt)).reshape(b * s, *xs[0].shape[1:])
        return CachedTargets(kind, flat(ids, np.int64), flat(values, np.float32),
                             flat(extra, np.float32), shape=(b, s))

    @property
    def samples(self) -> Dict[str, int]:
        return self.header["samples"]


def disk_use(folder: Path) -> Optional[str]:
    """"N bytes per token" over the shards (for the writer's last line)."""
    header = json.loads((folder / HEADER).read_text())
    tokens = sum(header["samples"].values()) * header["seq_length"]
    size = sum(p.stat().st_size for p in folder.glob("*.npz"))
    return f"{size / max(tokens, 1):.2f} bytes per token ({size:,} bytes, {tokens:,} tokens)"
