"""Paths a user gives, checked before any work: each error names the field that held the path."""

import tempfile
from pathlib import Path
from typing import Iterable

from megatron_minitron.config.errors import ConfigError


def existing_file(path: str, field: str, what: str = "file") -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(field, f"{path} is a folder, not a {what}", f"give the {what}'s path")
    if not p.is_file():
        raise ConfigError(field, f"{path} does not exist", f"fix the path to the {what}")
    return p


def utf8_files(paths: Iterable[str], field: str) -> None:
    """Text files that exist and decode as UTF-8 (read whole: eval texts are small)."""
    for path in paths:
        raw = existing_file(path, field, "text file").read_bytes()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = 1 + raw.count(b"\n", 0, e.start)
            raise ConfigError(field, f"{path}:{line} is not UTF-8 (byte 0x{raw[e.start]:02x})",
                              "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 IN "
                              "> OUT`") from e


def writable_dir(path: str, field: str) -> Path:
    """A folder that exists (made here if missing) and takes new files."""
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ConfigError(field, f"{path} is an existing file, not a folder",
                          "give a folder path (or move the file away)")
    for parent in p.parents:
        if parent.exists() and not parent.is_dir():
            raise ConfigError(field, f"{parent} (a parent of {path}) is a file",
                              "give a folder path whose parents are folders")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as e:
        raise ConfigError(field, f"{path} is not writable ({e.strerror or e})",
                          "choose a writable folder") from e
    return p


def new_file(path: str, field: str) -> Path:
    """A file to be (over)written: not a folder, its parent folder writable."""
    p = Path(path).expanduser()
    if p.is_dir():
        raise ConfigError(field, f"{path} is a folder, not a file",
                          "give a file path inside the folder")
    writable_dir(str(p.parent), field)
    return p
