"""Held-out texts for perplexity that no bench arm trains on: The Tempest (left out of the demo
corpus, megatron_minitron.data.corpus) and public-domain texts of other domains and eras taken
from Debian packages (fetched once with `apt-get download`, checked against the sha256 below,
unpacked with `dpkg-deb -x`, cached under <work>/heldout_texts):

    devil    Ambrose Bierce, The Devil's Dictionary (1911; satire), dict-devil 1.0-13.1,
             /usr/share/dictd/devil.dict.dz
    webster  Webster's Revised Unabridged Dictionary (1913; lexicography) as carried by
             GCIDE, dict-gcide 0.48.5+nmu2, /usr/share/dictd/gcide.dict.dz: the entries
             marked "[1913 Webster]" (public domain; the GCIDE additions are dropped)
    jargon   The Jargon File 4.4.7 (1975-2003; computing slang, placed in the public domain),
             dict-jargon 4.4.7-3.1, /usr/share/dictd/jargon.dict.dz

Each text is cut into non-overlapping windows; the first half of a text's windows are for
choosing knobs ("select"), the second half for the reported table ("report").
"""

import gzip
import hashlib
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Dict

DEBIAN = {  # name: (package=version, deb sha256, file in the package, characters used)
    "devil": ("dict-devil=1.0-13.1",
              "6a535684def2a1f70cd42da16d12d43f0e9dc3e54e4a329178eebab3170e3154",
              "usr/share/dictd/devil.dict.dz", (20_000, 220_000)),
    "webster": ("dict-gcide=0.48.5+nmu2",
                "7b0af5cfde3cbdef5e9d6e78f92ec335ced7c2790f37a40f49bebc6f7347ac0f",
                "usr/share/dictd/gcide.dict.dz", (20_000_000, 20_400_000)),
    "jargon": ("dict-jargon=4.4.7-3.1",
               "405f8168d7994ed2cb71407bb95493daec2e9aa66fc0461dafa74a9d6728a8c1", "usr/share/dictd/jargon.dict.dz",
               (100_000, 300_000)),
}


def _deb(work: Path, package: str, sha: str) -> Path:
    name, version = package.split("=")
    folder = work / "debs"
    folder.mkdir(parents=True, exist_ok=True)
    found = sorted(folder.glob(f"{name}_*.deb"))
    if not found:
        subprocess.run(["apt-get", "download", package], cwd=folder, check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        found = sorted(folder.glob(f"{name}_*.deb"))
    digest = hashlib.sha256(found[0].read_bytes()).hexdigest()
    if sha is not None and digest != sha:
        raise SystemExit(f"{found[0]}: sha256 {digest}, expected {sha}")
    return found[0]


def debian_text(work: Path, name: str) -> str:
    package, sha, member, (start, stop) = DEBIAN[name]
    cached = work / f"{name}.txt"
    if cached.is_file():
        return cached.read_text()
    deb = _deb(work, package, sha)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["dpkg-deb", "-x", str(deb), tmp], check=True)
        raw = gzip.decompress((Path(tmp) / member).read_bytes()).decode("utf-8", "replace")
    if name == "webster":  # keep whole 1913 Webster entries (blank-line separated blocks)
        blocks = raw[start:stop].split("\n\n")[1:-1]
        raw = "\n\n".join(b for b in blocks if "[1913 Webster]" in b)
        raw = raw.replace("[1913 Webster]\n", "").replace("[1913 Webster]", "")
    else:
        raw = raw[start:stop]
        raw = raw[raw.index("\n\n") + 2:]
    text = re.sub(r"\n{3,}", "\n\n", raw).strip()
    cached.write_text(text)
    return text


def texts(work: str) -> Dict[str, str]:
    """{name: text} of every held-out text (The Tempest first)."""
    from megatron_minitron.data.corpus import demo_heldout_text

    folder = Path(work).expanduser() / "heldout_texts"
    folder.mkdir(parents=True, exist_ok=True)
    out = {"tempest": demo_heldout_text()}
    out.update({name: debian_text(folder, name) for name in DEBIAN})
    return out


def package_hashes(work: str) -> Dict[str, str]:
    """{package=version: sha256 of the .deb} of the fetched packages."""
    folder = Path(work).expanduser() / "heldout_texts"
    return {package: hashlib.sha256(_deb(folder, package, sha).read_bytes()).hexdigest()
            for package, sha, _, _ in DEBIAN.values()}
