"""Data: tokenizer, indexed datasets, splits and blends."""

from dataclasses import dataclass, field
from typing import List, Optional

from megatron_minitron.config.errors import ConfigError

TOKENIZER_TYPES = ("auto", "sentencepiece", "huggingface", "byte")


@dataclass
class TokenizerConfig:
    """Which tokenizer turns text into ids."""

    type: str = "auto"
    """"sentencepiece" (a .model file), "huggingface" (tokenizer.json or its folder), "byte"
    (UTF-8 bytes, vocab 256 + eod; for tests), or "auto" (from the path)."""
    path: Optional[str] = None
    """File or folder of the tokenizer. Checkpoints record it, so loading one restores it."""

    def __post_init__(self):
        if self.type not in TOKENIZER_TYPES:
            raise ConfigError("data.tokenizer.type", f"unknown {self.type!r}",
                              f"use one of {TOKENIZER_TYPES}")


@dataclass
class DataConfig:
    """Training/validation data as megatron-core indexed datasets (.bin/.idx prefixes)."""

    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    """The tokenizer."""
    paths: List[str] = field(default_factory=list)
    """Dataset prefixes (path without .bin/.idx). Empty: the demo Shakespeare corpus, built on
    first use under data.cache_dir."""
    weights: Optional[List[float]] = None
    """Blend weights, one per path; None for equal weights."""
    split: str = "949,50,1"
    """Train/valid/test split of each dataset, in megatron's "a,b,c" form."""
    seq_length: int = 256
    """Tokens per sample."""
    cache_dir: str = "~/.cache/megatron_minitron"
    """Where the demo corpus, preprocessed data and dataset index caches are kept."""
    num_workers: int = 0
    """DataLoader worker processes."""

    def __post_init__(self):
        if self.seq_length < 2:
            raise ConfigError("data.seq_length", f"must be >= 2, got {self.seq_length}",
                              "use a longer sequence")
        if self.weights is not None and len(self.weights) != len(self.paths):
            raise ConfigError("data.weights", f"{len(self.weights)} weights for "
                              f"{len(self.paths)} paths", "give one weight per path or null")
        parts = self.split.split(",")
        try:
            vals = [float(p) for p in parts]
        except ValueError:
            vals = []
        if len(vals) != 3 or min(vals) < 0 or sum(vals) <= 0:
            raise ConfigError("data.split", f"bad split {self.split!r}",
                              "use three non-negative numbers like '949,50,1'")


@dataclass
class PreprocessConfig:
    """`minitron data`: text or JSONL files -> one megatron-core indexed dataset (.bin/.idx)."""

    input: List[str] = field(default_factory=list)
    """Text files (one document each), JSONL files (one document per line) or folders of them.
    Empty: prepare the demo Shakespeare corpus for data.tokenizer instead."""
    output_prefix: Optional[str] = None
    """Output path without .bin/.idx; use it in data.paths. None: RUN_DIR/data/text_document."""
    json_key: str = "text"
    """Field of each JSONL record that holds the document's text."""
    append_eod: bool = True
    """End every document with the tokenizer's eod id, so samples spanning documents are
    separated."""

    def __post_init__(self):
        if not self.json_key:
            raise ConfigError("preprocess.json_key", "is empty",
                              "name the JSONL field with the text, e.g. text")
        if self.output_prefix is not None and self.output_prefix.endswith((".bin", ".idx")):
            raise ConfigError("preprocess.output_prefix", f"{self.output_prefix!r} ends with "
                              "an extension", "give the prefix without .bin/.idx")
