"""constraints.txt pins shardgrad's whole runtime closure, and the image, `ray up` and CI
install with it."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from tests.helpers import require, unavailable

REPO = Path(__file__).resolve().parent.parent
CONSTRAINTS = REPO / "constraints.txt"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# What the image installs: the runtime and the PostgreSQL driver.
EXTRAS = ("postgres",)
NETWORK_TROUBLE = re.compile(
    r"NewConnectionError|Network is unreachable|Temporary failure in name resolution|"
    r"Max retries exceeded|ConnectTimeout|No matching distribution found"
)


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins() -> dict[str, str]:
    out = {}
    for line in CONSTRAINTS.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = re.fullmatch(r"([A-Za-z0-9._-]+)==(\S+)", line).groups()
            assert canonical(name) not in out, f"{name} pinned twice"
            out[canonical(name)] = version
    return out


def requirements() -> list[str]:
    """shardgrad's runtime dependencies and those of EXTRAS, as pyproject.toml lists them."""
    project = PYPROJECT["project"]
    extras = [r for extra in EXTRAS for r in project["optional-dependencies"][extra]]
    return project["dependencies"] + extras


def test_every_direct_dependency_is_pinned_within_its_range():
    packaging = require("packaging.requirements")
    pinned = pins()
    for line in requirements():
        requirement = packaging.Requirement(line)
        version = pinned.get(canonical(requirement.name))
        assert version, f"{requirement.name} is not in constraints.txt"
        assert requirement.specifier.contains(version, prereleases=True), (line, version)


@pytest.mark.network
def test_constraints_resolve_with_nothing_unpinned():
    """pip resolves the runtime closure under the constraints: every package it picks is
    pinned, and nothing is pinned that it does not pick (a stale pin)."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed"]
    cmd += ["--quiet", "--report", "-", "--constraint", str(CONSTRAINTS), *requirements()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=540, cwd=REPO)
    if proc.returncode != 0 and NETWORK_TROUBLE.search(proc.stderr):
        unavailable(f"PyPI unreachable: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stderr
    resolved = {
        canonical(item["metadata"]["name"]): item["metadata"]["version"]
        for item in json.loads(proc.stdout)["install"]
    }
    pinned = pins()
    unpinned = {n: v for n, v in resolved.items() if pinned.get(n) != v}
    assert not unpinned, f"resolved but not pinned in constraints.txt: {unpinned}"
    assert not set(pinned) - set(resolved), f"stale pins: {set(pinned) - set(resolved)}"


def test_dockerfile_installs_the_pins_then_the_package_without_deps():
    dockerfile = (REPO / "deploy" / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines()]
    # The base image by digest, not by tag alone.
    default = re.search(r"^ARG PYTHON_DIGEST=(sha256:[0-9a-f]{64})$", dockerfile, re.M)
    assert default, "deploy/Dockerfile pins no base image digest"
    assert "FROM python:${PYTHON_VERSION}-slim-bookworm@${PYTHON_DIGEST}" in lines

    def index(prefix: str) -> int:
        return next(i for i, line in enumerate(lines) if line.startswith(prefix))

    # Dependencies in their own layer, before any source is copied.
    copy_pins = index("COPY constraints.txt")
    install_pins = index("RUN pip install --requirement /tmp/constraints.txt")
    first_source = index("COPY pyproject.toml")
    assert copy_pins < install_pins < first_source
    assert index('RUN pip install --no-deps "/src"') > first_source
    assert not [line for line in lines if "pip install" in line and ">=" in line]


def test_ray_up_and_ci_install_with_the_same_pins():
    yaml = require("yaml")
    config = yaml.safe_load((REPO / "deploy" / "ray-up.yaml").read_text())
    mounts = config["file_mounts"].items()
    remote = [remote for remote, local in mounts if local == "./constraints.txt"]
    assert len(remote) == 1, "ray-up.yaml does not copy constraints.txt to the hosts"
    setup = config["setup_commands"]
    assert any(f"--requirement {remote[0]}" in command for command in setup)
    assert any("--no-deps" in c and ".whl" in c for c in setup)

    ci = (REPO / ".ci" / "run").read_text()
    assert re.search(r'^export PIP_CONSTRAINT="\$PWD/constraints\.txt"$', ci, re.M)
    assert ci.index("export PIP_CONSTRAINT") < ci.index("\nmake test")
