"""Train/valid/test GPTDatasets through megatron-core's BlendedMegatronDatasetBuilder.

Every rank calls build_datasets. Caches (demo corpus, its .bin/.idx, the sample index files) are
written by rank 0: ours under `is_rank0` + `barrier`, megatron's builder itself does the same for
its index files when torch.distributed is initialised (rank 0 first, a world barrier, then the
rest); without a process group it simply builds.
"""

import contextlib
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Tuple
from unittest import mock

import torch.distributed as dist

from megatron_minitron.config.data import DataConfig
from megatron_minitron.config.errors import ConfigError
from megatron_minitron.config.train import TrainConfig
from megatron_minitron.data import corpus
from megatron_minitron.data.preprocess import preprocess
from megatron_minitron.data.tokenizer import Tokenizer

SPLITS = ("train", "valid", "test")


def samples_per_split(train: TrainConfig) -> Tuple[int, int, int]:
    """Samples each split must provide for the plan (Megatron-LM's train_valid_test_num_samples):
    every step's global batch, and eval_iters batches at every evaluation plus the final one."""
    evals = (train.train_iters // train.eval_interval if train.eval_interval else 0) + 1
    eval_samples = evals * train.eval_iters * train.global_batch_size
    return train.train_iters * train.global_batch_size, eval_samples, eval_samples


def demo_prefix(tokenizer: Tokenizer, cache_dir: str) -> str:
    """Where the demo corpus tokenized by this tokenizer lives (keyed by its identity)."""
    root = corpus.cache_root(cache_dir) / "indexed"
    return str(root / f"shakespeare_{tokenizer.name}_{tokenizer.identity()}_text_document")


def prepare_demo_dataset(tokenizer: Tokenizer, cache_dir: str, progress: bool = False) -> str:
    """Download, clean and tokenize the demo corpus once; return its dataset prefix."""
    prefix = demo_prefix(tokenizer, cache_dir)
    if not Path(prefix + ".idx").is_file():  # .idx is renamed into place last
        jsonl = corpus.demo_corpus_jsonl(cache_dir)
        preprocess([str(jsonl)], prefix, tokenizer, json_key="text", progress=progress)
    return prefix


def check_prefix(prefix: str) -> int:
    """Number of documents in a dataset prefix; ConfigError naming data.paths if unusable."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    if prefix.endswith((".bin", ".idx")):
        raise ConfigError("data.paths", f"{prefix!r} includes an extension",
                          "give the prefix without .bin/.idx")
    missing = [s for s in (".bin", ".idx") if not Path(prefix + s).is_file()]
    if missing:
        raise ConfigError("data.paths", f"no {' or '.join(prefix + s for s in missing)}",
                          "run `minitron data preprocess.input=... preprocess.output_prefix="
                          "PREFIX` first, or leave data.paths empty for the demo corpus")
    n = len(IndexedDataset(prefix, mmap=True))
    if n == 0:
        raise ConfigError("data.paths", f"{prefix} has no documents",
                          "preprocess non-empty input into it")
    return n


def check_split(prefix: str, documents: int, split: str, num_samples: Sequence[int]) -> None:
    """Refuse a split with a share that rounds to zero documents. Megatron builds every split
    with a share, even one asked for 0 samples, and its epoch count then never ends (zero
    tokens per epoch never reach the 1 extra token it always requests): e.g. the 0.1% test
    share of '949,50,1' on a corpus of fewer than 500 documents hangs `minitron importance`."""
    from megatron.core.datasets.blended_megatron_dataset_config import (
        convert_split_vector_to_split_matrix, parse_and_normalize_split)

    matrix = convert_split_vector_to_split_matrix(parse_and_normalize_split(split))
    for i, (name, bounds, wanted) in enumerate(zip(SPLITS, matrix, num_samples)):
        if bounds is None:
            continue
        beg, end = (int(round(b * documents)) for b in bounds)
        if end <= beg:
            shares = split.split(",")
            shares[i] = "0"
            unused = f"data.split='{','.join(shares)}' if the {name} split is not used, or "
            raise ConfigError("data.split", f"the {name} split of {split!r} gets no document of "
                              f"the {documents} in {prefix}",
                              f"{'' if wanted else unused}give {name} a larger share, or use a "
                              "dataset with more documents")


def gpt_dataset_config(data: DataConfig, prefixes: List[str], tokenizer: Tokenizer, seed: int):
    from megatron.core.datasets.gpt_dataset import GPTDatasetConfig

    weights = data.weights
    if weights is None and len(prefixes) > 1:
        weights = [1.0] * len(prefixes)  # megatron's None would mean "in proportion to size"
    return GPTDatasetConfig(
        random_seed=seed,
        sequence_length=data.seq_length,
        blend=(prefixes, weights),
        split=data.split,
        path_to_cache=str(corpus.cache_root(data.cache_dir) / "index_cache"),
        tokenizer=tokenizer,
        reset_position_ids=False,
        reset_attention_mask=False,
        eod_mask_loss=False,
        create_attention_mask=False,  # causal attention needs no explicit mask
        mmap_bin_files=True,
    )


def build_datasets(data: DataConfig, tokenizer: Tokenizer, num_samples: Sequence[int],
                   seed: int, is_rank0: bool = True,
                   barrier: Optional[Callable[[], None]] = None) -> List[Optional[object]]:
    """[train, valid, test] GPTDatasets (None for a split with no share) of at least
    num_samples samples each; see samples_per_split. Call on every rank with the same seed."""
    prefixes = [str(Path(p).expanduser()) for p in data.paths]
    if not prefixes:
        if is_rank0:
            prefixes = [prepare_demo_dataset(tokenizer, data.cache_dir, progress=True)]
        else:
            prefixes = [demo_prefix(tokenizer, data.cache_dir)]
    if barrier is not None:
        barrier()
    for prefix in prefixes:
        check_split(prefix, check_prefix(prefix), data.split, num_samples)
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder)
    from megatron.core.datasets.gpt_dataset import GPTDataset

    config = gpt_dataset_config(data, prefixes, tokenizer, seed)
    builder = BlendedMegatronDatasetBuilder(GPTDataset, [int(n) for n in num_samples],
                                            lambda: True, config)
    with _single_process_rank():
        return builder.build()


@contextlib.contextmanager
def _single_process_rank() -> Iterator[None]:
    """megatron-core 0.16's BlendedDataset asks torch.distributed.get_rank() without checking
    that a process group exists (GPTDataset checks); without one, this process is rank 0."""
    if dist.is_available() and dist.is_initialized():
        yield
        return
    with mock.patch.object(dist, "get_rank", lambda group=None: 0):
        yield
