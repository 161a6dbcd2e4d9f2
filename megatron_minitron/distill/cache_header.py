"""What a teacher cache was built from (teacher, data, settings), and the checks that refuse a
cache built from something else, by the config field that names it."""

import hashlib
import json
from pathlib import Path
from typing import Dict, Optional

from megatron_minitron.checkpoint import dist as ckpt
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.schema import MinitronConfig
from megatron_minitron.data.tokenizer import Tokenizer
from megatron_minitron.distill.cache_records import id_dtype
from megatron_minitron.distill.teacher_cache import FORMAT


def _sha(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def teacher_hash(path: str, field: str) -> str:
    """The teacher checkpoint's identity: its architecture and the content digests of its
    files (recorded in its header at save, so nothing large is read)."""
    header = json.loads((ckpt.verified(path, field, verify=False) / ckpt.HEADER).read_text())
    return _sha({"model": header["model"], "files": header.get("files") or header})


def data_hash(cfg: MinitronConfig, tok: Tokenizer) -> str:
    """The data's identity: each dataset's document index (.idx digest) and token file size,
    the blend, split, sequence length, seed and tokenizer. Sample-level token hashes in the
    shards catch anything this misses."""
    from megatron_minitron.data.datasets import demo_prefix

    prefixes = [str(Path(p).expanduser()) for p in cfg.data.paths] or [
        demo_prefix(tok, cfg.data.cache_dir)]
    files = [{"idx": hashlib.sha256(Path(p + ".idx").read_bytes()).hexdigest(),
              "bin_bytes": Path(p + ".bin").stat().st_size} for p in prefixes]
    return _sha({"files": files, "weights": cfg.data.weights, "split": cfg.data.split,
                 "seq_length": cfg.data.seq_length, "seed": cfg.runtime.seed,
                 "tokenizer": tok.identity()})


def samples_needed(cfg: MinitronConfig) -> Dict[str, int]:
    """What a run of this train plan reads: every train step's global batch and the
    validation split's first eval_iters global batches (read at each evaluation)."""
    t = cfg.train
    return {"train": t.train_iters * t.global_batch_size,
            "valid": t.eval_iters * t.global_batch_size}


def dataset_samples(samples: Dict[str, int]) -> tuple:
    """The (train, valid, test) sample counts the datasets are built for, by the writer and by
    every reader: megatron's GPTDataset orders its samples according to how many it is asked
    for, so runs with other train plans (search candidates, pipeline rounds) read the same
    samples only when they build the datasets the cache was built from."""
    return samples["train"], samples["valid"], samples["valid"]


def read_header(folder: str) -> dict:
    from megatron_minitron.distill.teacher_cache import HEADER, read_json

    return read_json(Path(folder).expanduser() / HEADER, "distill.teacher_cache")


def build_header(cfg: MinitronConfig, teacher: str, tok: Tokenizer, vocab_size: int) -> dict:
    c = cfg.cache
    return {"format": FORMAT, "teacher": teacher_hash(teacher, "distill.teacher_checkpoint"),
            "teacher_path": str(teacher), "data": data_hash(cfg, tok), "mode": c.mode, "k": c.k,
            "temperature": c.temperature, "vocab_size": vocab_size,
            "seq_length": cfg.data.seq_length, "seed": cfg.runtime.seed,
            "samples": samples_needed(cfg), "id_dtype": id_dtype(vocab_size).name,
            "logprob_dtype": c.logprob_dtype}


def same_build(old: dict, new: dict) -> Optional[str]:
    """The first setting in which two headers differ (the teacher's path may move)."""
    for key in new:
        if key != "teacher_path" and old.get(key) != new[key]:
            return key
    return None


def check_for_distill(header: dict, cfg: MinitronConfig, folder: str,
                      data: Optional[str] = None) -> None:
    """Refuse a cache that the distillation run `cfg` cannot use, naming the field."""
    f, d = "distill.teacher_cache", cfg.distill
    if d.teacher_checkpoint and teacher_hash(d.teacher_checkpoint, "distill.teacher_"
                                             "checkpoint") != header["teacher"]:
        raise ConfigError(f, f"{folder} was built for another teacher "
                          f"({header['teacher_path']}), not {d.teacher_checkpoint}",
                          "point it to this teacher's cache, or build one with `minitron "
                          "cache-teacher`")
    if data is not None and data != header["data"]:
        raise ConfigError(f, f"{folder} was built for other data (data.paths, split, "
                          "seq_length, runtime.seed or tokenizer differ)",
                          "build a cache for this data with `minitron cache-teacher`")
    if header["seq_length"] != cfg.data.seq_length:
        raise ConfigError(f, f"{folder} holds {header['seq_length']}-token samples, "
                          f"data.seq_length is {cfg.data.seq_length}",
                          "use the cache's seq_length or build another cache")
    if header["temperature"] != d.temperature:
        raise ConfigError("distill.temperature", f"{d.temperature} differs from the "
                          f"temperature {header['temperature']} the cache {folder} was built at",
                          f"set distill.temperature={header['temperature']}")
    for split, n in samples_needed(cfg).items():
        if header["samples"][split] < n:
            raise ConfigError(f, f"{folder} holds {header['samples'][split]} {split} samples; "
                              f"this run reads {n}", "build the cache with at least this "
                              "run's train.train_iters, global_batch_size and eval_iters")
