"""Text / JSONL -> megatron-core indexed dataset (.bin/.idx), one sequence per document."""

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Sequence, Tuple

import numpy
from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.data.tokenizer import Tokenizer

TEXT_SUFFIXES = (".txt", ".text", ".md")
JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")


@dataclass(frozen=True)
class PreprocessStats:
    """What one preprocessing run wrote."""

    output_prefix: str
    documents: int
    tokens: int


def token_dtype(vocab_size: int) -> type:
    """megatron's choice (uint16 below 65500 ids, else int32); GPTDataset reads it from .idx."""
    return DType.optimal_dtype(vocab_size)


def input_files(inputs: Sequence[str], field: str = "preprocess.input") -> List[Path]:
    """The files behind the inputs (folders expand to their text/JSONL files, sorted)."""
    if not inputs:
        raise ConfigError(field, "no input given", "list text/JSONL files or folders")
    files: List[Path] = []
    for item in inputs:
        p = Path(item).expanduser()
        if p.is_dir():
            found = sorted(f for f in p.rglob("*")
                           if f.is_file() and f.suffix in TEXT_SUFFIXES + JSONL_SUFFIXES)
            if not found:
                raise ConfigError(field, f"folder {item} has no {TEXT_SUFFIXES + JSONL_SUFFIXES}"
                                  " files", "point to a folder with text or JSONL files")
            files += found
        elif p.is_file():
            files.append(p)
        else:
            raise ConfigError(field, f"{item} does not exist", "fix the path")
    return files


def iter_documents(path: Path, json_key: str = "text") -> Iterator[Tuple[str, int]]:
    """(document text, bytes consumed) for one file; JSONL gives one document per line."""
    if path.suffix not in JSONL_SUFFIXES:
        raw = path.read_bytes()
        yield _utf8(raw, path, 1), len(raw)
        return
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                yield "", len(line)
                continue
            try:
                record = json.loads(_utf8(line, path, lineno))
            except json.JSONDecodeError as e:
                raise ConfigError("preprocess.input", f"{path}:{lineno} is not JSON ({e.msg})",
                                  "give one JSON object per line") from e
            if not isinstance(record, dict) or json_key not in record:
                raise ConfigError("preprocess.json_key", f"{path}:{lineno} has no key "
                                  f"{json_key!r}", "set preprocess.json_key to the text field")
            if not isinstance(record[json_key], str):
                raise ConfigError("preprocess.json_key", f"{path}:{lineno}: {json_key!r} holds "
                                  f"a {type(record[json_key]).__name__}, not text",
                                  "set preprocess.json_key to the field holding the text")
            yield record[json_key], len(line)


def _utf8(raw: bytes, path: Path, lineno: int) -> str:
    """Strict: silently replacing bytes would train on U+FFFD where the text had letters."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = lineno + raw.count(b"\n", 0, e.start)
        raise ConfigError("preprocess.input", f"{path}:{line} is not UTF-8 (byte "
                          f"0x{raw[e.start]:02x})", "re-encode the file as UTF-8, e.g. "
                          "`iconv -f latin1 -t utf-8 IN > OUT`") from e


def preprocess(inputs: Sequence[str], output_prefix: str, tokenizer: Tokenizer,
               json_key: str = "text", append_eod: bool = True,
               progress: bool = True) -> PreprocessStats:
    """Tokenize every non-empty document into output_prefix.{bin,idx}. The files appear
    atomically (written under a temporary name, .idx renamed last), so a crash leaves no
    half-written dataset that looks complete."""
    files = input_files(inputs)
    out = Path(output_prefix).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = f"{out}.tmp{os.getpid()}"
    try:
        docs, tokens = _write(files, tmp, tokenizer, json_key, append_eod, progress)
    except BaseException:
        for suffix in (".bin", ".idx"):
            if os.path.exists(tmp + suffix):
                os.remove(tmp + suffix)
        raise
    os.replace(tmp + ".bin", f"{out}.bin")
    os.replace(tmp + ".idx", f"{out}.idx")
    stats = PreprocessStats(str(out), docs, tokens)
    if progress:
        print(f"wrote {out}.bin/.idx: {docs:,} documents, {tokens:,} tokens")
    return stats


def _write(files: List[Path], tmp: str, tokenizer: Tokenizer, json_key: str, append_eod: bool,
           progress: bool) -> Tuple[int, int]:
    dtype = token_dtype(tokenizer.vocab_size)
    builder = IndexedDatasetBuilder(tmp + ".bin", dtype=dtype)
    docs = tokens = 0
    with _progress(progress, sum(f.stat().st_size for f in files)) as advance:
        for path in files:
            for text, nbytes in iter_documents(path, json_key):
                advance(nbytes)
                ids = tokenizer.encode(text) if text.strip() else []
                if not ids:
                    continue
                if append_eod:
                    ids.append(tokenizer.eod)
                builder.add_document(numpy.asarray(ids, dtype=dtype), [len(ids)])
                docs += 1
                tokens += len(ids)
    builder.finalize(tmp + ".idx")
    if docs == 0:
        raise ConfigError("preprocess.input", f"no non-empty documents in "
                          f"{[str(f) for f in files]}",
                          "check the files' contents (and preprocess.json_key for JSONL)")
    return docs, tokens


class _progress:
    """A rich bar over input bytes, or nothing."""

    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total, self.bar = enabled, total, None

    def __enter__(self):
        if not self.enabled:
            return lambda n: None
        from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                   TimeRemainingColumn)

        self.bar = Progress(TextColumn("tokenizing"), BarColumn(), DownloadColumn(),
                            TimeRemainingColumn())
        self.bar.start()
        task = self.bar.add_task("tokenizing", total=self.total)
        return lambda n: self.bar.advance(task, n)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False
