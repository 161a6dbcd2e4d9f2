"""Tokenizers behind one interface: UTF-8 bytes, SentencePiece, Hugging Face tokenizer.json.

A Tokenizer also carries what megatron-core's GPTDataset reads from `config.tokenizer`
(`eod`, `vocab_size`, `unique_identifiers`, `tokenize`/`detokenize`), so it is passed there as is.
"""

import hashlib
import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from megatron_minitron.config.data import TokenizerConfig
from megatron_minitron.config.errors import ConfigError

HF_EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|im_end|>", "[SEP]")
"""Tried in order when a tokenizer.json folder has no tokenizer_config.json naming eos_token."""


class Tokenizer(ABC):
    """Text <-> ids. `vocab_size` is the real size (ids 0..vocab_size-1); `eod` ends documents."""

    name: str = ""
    path: Optional[str] = None

    @abstractmethod
    def encode(self, text: str) -> List[int]:
        """Ids of the text, without special tokens (no BOS, no EOD)."""

    @abstractmethod
    def decode(self, ids: Sequence[int]) -> str:
        ...

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        ...

    @property
    @abstractmethod
    def eod(self) -> int:
        ...

    def file_digest(self) -> str:
        """sha256 of the tokenizer's file ("" for the byte tokenizer)."""
        return ""

    def identity(self) -> str:
        """A short hash that changes whenever the id mapping could: keys preprocessed caches."""
        key = json.dumps({"type": self.name, "sha256": self.file_digest(),
                          "vocab_size": self.vocab_size, "eod": self.eod}, sort_keys=True)
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def describe(self) -> Dict[str, object]:
        """What a checkpoint header stores; `tokenizer_from_description` rebuilds from it."""
        return {"type": self.name, "path": self.path, "vocab_size": self.vocab_size,
                "eod": self.eod, "sha256": self.file_digest(), "identity": self.identity()}

    # megatron-core's GPTDataset / BlendedMegatronDatasetConfig read these names.
    @property
    def unique_identifiers(self) -> Dict[str, object]:
        return {"class": type(self).__name__, "identity": self.identity()}

    def tokenize(self, text: str) -> List[int]:
        return self.encode(text)

    def detokenize(self, ids: Sequence[int]) -> str:
        return self.decode(ids)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(path={self.path!r}, vocab_size={self.vocab_size})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes are ids 0..255; eod is 256; vocab_size 257 (conf/model/tiny.yaml)."""

    name = "byte"

    def encode(self, text: str) -> List[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="replace")

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eod(self) -> int:
        return 256


_DIGESTS: Dict[Tuple[str, float, int], str] = {}


def _sha256(path: Path) -> str:
    """Cached per (path, mtime, size): megatron hashes the tokenizer into every dataset key."""
    st = path.stat()
    key = (str(path), st.st_mtime, st.st_size)
    if key not in _DIGESTS:
        _DIGESTS[key] = hashlib.sha256(path.read_bytes()).hexdigest()
    return _DIGESTS[key]


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece .model file (Llama 2, Mistral); eod is its eos piece."""

    name = "sentencepiece"

    def __init__(self, path: str):
        import sentencepiece

        self.path = str(Path(path).resolve())
        self._sp = sentencepiece.SentencePieceProcessor(model_file=self.path)
        if self._sp.eos_id() < 0:
            raise ConfigError("data.tokenizer.path", f"{path} has no eos piece to end documents",
                              "use a SentencePiece model trained with an eos_id")

    def encode(self, text: str) -> List[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: Sequence[int]) -> str:
        return self._sp.decode([int(i) for i in ids])

    @property
    def vocab_size(self) -> int:
        return self._sp.vocab_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    def file_digest(self) -> str:
        return _sha256(Path(self.path))


class HuggingFaceTokenizer(Tokenizer):
    """A Hugging Face tokenizer.json (or a folder with one), read offline by `tokenizers`."""

    name = "huggingface"

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        p = Path(path).resolve()
        file = p / "tokenizer.json" if p.is_dir() else p
        if not file.is_file():
            raise ConfigError("data.tokenizer.path", f"no tokenizer.json in {path}",
                              "point to a tokenizer.json file or a folder that holds one")
        self.path, self._file = str(p), file
        self._tok = HFTokenizer.from_file(str(file))
        self._eod = self._find_eos(file.parent)

    def _find_eos(self, folder: Path) -> int:
        names = list(HF_EOS_CANDIDATES)
        config = folder / "tokenizer_config.json"
        if config.is_file():
            eos = json.loads(config.read_text()).get("eos_token")
            eos = eos.get("content") if isinstance(eos, dict) else eos
            if eos:
                names.insert(0, eos)
        for token in names:
            tid = self._tok.token_to_id(token)
            if tid is not None:
                return tid
        raise ConfigError("data.tokenizer.path", f"{self._file} has no end-of-text token "
                          f"(looked for {names})",
                          "add tokenizer_config.json with eos_token next to tokenizer.json")

    def encode(self, text: str) -> List[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    def file_digest(self) -> str:
        return _sha256(self._file)


def infer_type(path: Optional[str]) -> str:
    """The tokenizer type for "auto": none -> byte, *.model -> sentencepiece, *.json or a folder
    with tokenizer.json -> huggingface, a folder with only tokenizer.model -> sentencepiece."""
    if path is None:
        return "byte"
    p = Path(path).expanduser()
    if not p.exists():
        raise ConfigError("data.tokenizer.path", f"{path} does not exist",
                          "give an existing tokenizer file/folder, or null for bytes")
    if p.is_dir():
        if (p / "tokenizer.json").is_file():
            return "huggingface"
        if (p / "tokenizer.model").is_file():
            return "sentencepiece"
    elif p.suffix == ".model":
        return "sentencepiece"
    elif p.suffix == ".json":
        return "huggingface"
    raise ConfigError("data.tokenizer.path", f"cannot tell the tokenizer type of {path}",
                      "set data.tokenizer.type to sentencepiece or huggingface")


def build_tokenizer(cfg: TokenizerConfig) -> Tokenizer:
    kind = infer_type(cfg.path) if cfg.type == "auto" else cfg.type
    if kind == "byte":
        return ByteTokenizer()
    if cfg.path is None:
        raise ConfigError("data.tokenizer.path", f"type {kind!r} needs a path",
                          "set data.tokenizer.path, or use type=byte")
    path = Path(cfg.path).expanduser()
    if not path.exists():
        raise ConfigError("data.tokenizer.path", f"{cfg.path} does not exist",
                          "give an existing tokenizer file or folder")
    if kind == "sentencepiece":
        if path.is_dir():
            path = path / "tokenizer.model"
        try:
            return SentencePieceTokenizer(str(path))
        except (OSError, RuntimeError) as e:
            raise ConfigError("data.tokenizer.path", f"cannot load SentencePiece model {path}: "
                              f"{e}", "point to a valid .model file") from e
    try:
        return HuggingFaceTokenizer(str(path))
    except Exception as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError("data.tokenizer.path", f"cannot load tokenizer.json from {path}: {e}",
                          "point to a valid Hugging Face tokenizer.json") from e


def tokenizer_from_description(desc: Dict[str, object]) -> Tokenizer:
    """Rebuild the tokenizer a checkpoint recorded; refuse one whose id mapping changed."""
    tok = build_tokenizer(TokenizerConfig(type=str(desc["type"]), path=desc.get("path")))
    if desc.get("identity") not in (None, tok.identity()):
        raise ConfigError("data.tokenizer.path", f"tokenizer at {desc.get('path')} differs from "
                          "the one the checkpoint was trained with",
                          "restore the original tokenizer file or set data.tokenizer.path")
    return tok
